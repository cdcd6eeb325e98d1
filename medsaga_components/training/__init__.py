"""The few-shot training run: the experiment (data, splits, loaders; ``experiment.py``), the
memory-efficient mode (``memory.py``), stopping at a plateau or a time cap (``stopping.py``),
export of the best model (``handlers.py``), resume and logging (``setup.py``) and the CPU
allocator setting (``cpu_allocator.py``). Bundle configs reach it through ``engine``."""
