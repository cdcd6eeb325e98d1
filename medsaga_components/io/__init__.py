"""General file I/O every part uses: checkpoints read safely and loaded strictly
(``checkpoints.py``), files written atomically (``atomic.py``)."""
