"""Inference: from a volume (and a user's prompts) to a label map.

* ``slices.py``: a volume slice by slice in the network's square frame (``run inference``);
* ``prompted.py``: from a user's boxes or clicks, on a slice or a volume (MONAI Label);
* ``two_pass.py``: prompted networks without a user's prompts (a first pass finds them);
* ``zoom.py``, ``flips.py``: reading each slice at a higher scale, test-time flips;
* ``model.py``: the trained model a bundle serves, loaded strictly, and what it was trained as;
* ``preprocessing.py``, ``volumes.py``, ``writer.py``: intensity scaling, the volumes of a
  folder, atomic NIfTI writes.
"""
