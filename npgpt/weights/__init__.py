"""Weight files, each layer importing only those above it in this list:
lazy.py (tensors read on demand into the model's buffers), safetensors.py and tfbundle.py (the
file formats, written here from their specifications), names.py (each format's tensor names and
layout onto npgpt's), nanogpt.py and llmc.py (nanoGPT's ckpt.pt, llm.c's model files), hub.py (GPT-2's
names found in a local Hugging Face cache), checkpoint_checks.py and checkpoint.py (npgpt's HDF5
training checkpoint, and what it must not be before it is trusted), export.py (export_hf: written for
Hugging Face), pretrained.py (load_pretrained: every format behind one call)."""
