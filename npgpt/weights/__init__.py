"""Weight files, each layer importing only those above it in this list:
lazy.py (tensors read on demand into the model's buffers), safetensors.py and tfbundle.py (the
file formats, written here from their specifications), names.py (each format's tensor names and
layout onto npgpt's), checkpoint.py (npgpt's HDF5 training checkpoint), pretrained.py
(load_pretrained, export_hf: every format behind one call)."""
