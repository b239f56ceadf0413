"""The ecosystem suite: a converted model under the tools people train and evaluate with (transformers'
Trainer, TRL, PEFT, accelerate/FSDP2, lm-eval). Offline; the tiny models come from ../hf/tiny_models.py."""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach a model hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "hf"))
