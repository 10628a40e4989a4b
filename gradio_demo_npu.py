"""Web editor for HiDream-E1.1 / E1-Full on Ascend NPU, CUDA or CPU.

    python gradio_demo_npu.py                      # E1.1, http://127.0.0.1:7860 (this machine only)
    python gradio_demo_npu.py --tiny --port 7861   # built-in tiny random-weight model (output is noise)
    python gradio_demo_npu.py --model e1-full --host 0.0.0.0 --auth team:secret --results-dir /data/results

The model is loaded once, when the server starts; the app itself lives in hidream_edit/web/
(service.py: what it does; layout.py: the gradio page).
"""

import os
import sys

os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")  # `import torch` must survive a missing CANN
os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")  # c10d warnings dump C++ frames; our errors are one line
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # a device server has no business calling home

from hidream_edit.web.layout import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
