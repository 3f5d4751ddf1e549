import cProfile, pstats, sys, asyncio, threading
from bench import bulk_update as b
orig = b.update
async def u(*a):
    pr = cProfile.Profile(); pr.enable()
    r = await orig(*a)
    pr.disable(); pstats.Stats(pr).sort_stats("tottime").print_stats(25); return r
b.update = u
sys.argv = ["x", "--studies", "600"]
b.main()
