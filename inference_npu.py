"""Edit an image with HiDream-E1-Full (I1-Full + LoRA) on Ascend NPU, CUDA or CPU.

    python inference_npu.py --image in.png --instruction "add a hat" \
        --target-description "a dog wearing a red hat" --output out.png
    python inference_npu.py --tiny ...   # built-in tiny random-weight model (output is noise)
"""

import os
import sys

os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")  # `import torch` must survive a missing CANN
os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")  # c10d warnings dump C++ frames; our errors are one line

from hidream_edit.cli import run_edit_cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_edit_cli(sys.argv[1:], "e1-full"))
