"""Process tuning shared by pods and the local runner: CPU quotas and thread budgets (`cpus`), the glibc
allocator (`malloc`), step timing (`timing`) and file locks (`filelock`)."""
