"""``kvframe-launch``: starts a kvframe job's processes (a scheduler, servers and workers for the
stores with servers, or workers only with ``-s 0``, for stores such as ``nccl``) locally, over ssh or
with mpirun, and watches them.  See :mod:`kvframe_launch.launch` and README.md."""
