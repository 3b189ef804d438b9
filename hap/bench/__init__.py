"""``hap-bench``: the benchmark matrix (``matrix``), hap against what users run instead
(``torch_baseline``), each cell prepared in its own process (``prepare``) against the
single-device reference (``reference``), and the driver (``run``)."""
