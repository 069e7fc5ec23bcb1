"""research

Designs that were built and measured but have not met their pre-registered criteria, kept runnable from a checkout
(`python -m research.<package>.<module>` from the repository root) so that docs/findings.md and docs/demo_world.md
stay reproducible. Not part of the installed `tga` package; their tests are in tests/.
"""
