import asyncio, time, sys, functools
import archive.update as upd
import indexer.writes as writes
from bench import bulk_update as b
T = {}
def timed(name, fn):
    @functools.wraps(fn)
    async def w(*a, **k):
        t = time.perf_counter()
        try: return await fn(*a, **k)
        finally: T[name] = T.get(name, 0) + time.perf_counter() - t
    return w
upd.UpdateHandler._next_batch = timed("next_batch", upd.UpdateHandler._next_batch)
upd.UpdateHandler._rewrite = timed("rewrite", upd.UpdateHandler._rewrite)
upd.replace_instances = timed("replace", upd.replace_instances)
upd.append = timed("append", upd.append)
upd._older_update_pending = timed("older", upd._older_update_pending)
writes.index_instances = timed("index_instances", writes.index_instances)
orig = b.update
async def u(*a):
    r = await orig(*a); print({k: round(v, 2) for k, v in T.items()}); return r
b.update = u
sys.argv = ["x", "--studies", "300"]
b.main()
