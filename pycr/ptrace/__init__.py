"""ptrace in three layers: binding (raw requests), thread (one seized thread),
inject (running syscalls inside a stopped thread)."""
