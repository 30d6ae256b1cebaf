"""A sample worker: does N units of work, printing progress, then says which dyno it ran on."""

import os
import sys
import time

units = int(sys.argv[1]) if len(sys.argv) > 1 else 1
for unit in range(1, units + 1):
    print(f"worker: unit {unit} of {units} done", flush=True)
    time.sleep(0.1)
print(f"worker: finished on {os.environ.get('DYNO', 'no dyno')}", flush=True)
