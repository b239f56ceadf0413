"""The Hugging Face integration suite: offline, helpers in tiny_models.py."""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach a model hub
sys.path.insert(0, os.path.dirname(__file__))
