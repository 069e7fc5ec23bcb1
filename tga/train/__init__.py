"""tga/train

Training the VLM: one stage end to end (`run`), its Trainer and callbacks (`trainer`, `cost`, `tracking`, `plots`),
process set-up under DeepSpeed (`distributed`), checkpoints and resuming (`checkpoint`, `resilience`), and the checks
made before the first step (`preflight`). A regular package, so that a non-editable install ships it.
"""
