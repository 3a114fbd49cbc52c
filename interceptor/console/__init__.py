"""The inspection verbs of the ``interceptor`` command (bpftool-style ``OBJECT COMMAND``):
argument parsing and printing only; the data comes from interceptor.ops."""
