"""Imported by the loaders' fork server only (multiprocessing's forkserver preload), to tie it to its rank:
when the rank dies, even by SIGKILL, the fork server gets SIGKILL too, and with it the loader workers
it forked (each gets SIGKILL when the fork server dies: ``die_with_parent`` in their init). Without
it, a rank killed with -9 left its fork server and workers running for minutes (issue 14, finding 4)."""

from .loader import die_with_parent

die_with_parent()
