"""tga/defense

Inference-time defences beside TGA, one module each, behind one option (`--defense`, see `dispatch`): AdaShield-S's
static defence prompt (`adashield`), ECSO's harm check and image-to-text answer (`ecso`), and CMRM's calibrated
hidden-state shift (`cmrm`, calibrated by `calibrate`). Every defence reports what it cost per request (`cost`).
"""
