"""A toy captioned-video world small enough to train the tiny presets on a CPU.

`dataset` draws coloured shapes moving across a plain background with captions such as
"a red circle moves right"; `score` checks a generated video against its caption; `train` fits the
tiny VAE, then the tiny DiT, on them; `weights/` holds the result in the real checkpoints' layouts.
"""
