import sys
import archive.update as upd
from bench import bulk_update as b
upd.PART = int(sys.argv[1])
sys.argv = ["x", "--studies", sys.argv[2]]
b.main()
