"""research/world2

Demo world 2 (docs/demo_world.md): a text world and a tiny text LLM built so that the LLM's refusal would be a
judgement about content made in its middle blocks, the premise TGA needs. It stopped at its closest design
(criterion 1 not met); the two-phase design did not meet its criteria either. Modules: `world` (vocabulary and
scenes), `answers` and `corpus` (the training text), `llm` (training and measurement), `criteria` (the acceptance
checks), `assets` (cached build), `variant` (one measured design variant, the docs' tables) and `two_phase`
("knowledge first, safety after").
"""
