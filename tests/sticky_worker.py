"""A stand-in for kernel_bench's compile worker (tests/test_kernel_bench.py): once the job "bad" has run in a process,
every later job there fails with its CUDA error, as a real sticky fault does. Kept light: spawn imports it in each
child."""
_POISONED = []


def warm(job):
    if job == "bad" or _POISONED:
        _POISONED.append(job)
        return job, 0.0, "AcceleratorError('CUDA error: misaligned address')"
    if job == "oom":
        return job, 0.0, "OutOfResources(1, 0, 'shared memory')"
    return job, 0.0, None
