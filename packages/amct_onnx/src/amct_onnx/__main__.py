"""``python -m amct_onnx``: the command line of :mod:`amct_onnx.cli`."""
from amct_onnx.cli import main

raise SystemExit(main())
