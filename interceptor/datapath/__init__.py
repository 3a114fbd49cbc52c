"""The BPF datapath: loads bpf/*.c through bcc, attaches it to veths with pyroute2, owns the
pinned maps and the heartbeat.  The only package that imports bcc or pyroute2."""
