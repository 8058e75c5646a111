"""Where do the bytes of one SSE connection go? A first split of the gateway's RSS delta.

Opens N raw TCP connections to a running gateway without sending anything (cost of an
accepted connection waiting for its request head), then sends each one's GET for the same
long, silent generation (extra cost of a subscribed SSE stream). Run against a fresh gateway:
a second round reuses freed allocator pages and shows less.

    python3 loadtest/scripts/conn_breakdown.py PORT PID N
"""
import asyncio, json, sys, time, urllib.request
port, pid, n = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
def rss():
    for l in open(f"/proc/{pid}/status"):
        if l.startswith("VmRSS:"): return int(l.split()[1]) * 1024
def anon():
    for l in open(f"/proc/{pid}/smaps_rollup"):
        if l.startswith("Anonymous:"): return int(l.split()[1]) * 1024
body = json.dumps({"model":"m","messages":[{"role":"user","content":"x"}],"mock":{"tokens":100,"interval_ms":60000,"first_token_ms":60000}}).encode()
req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/generations", data=body, headers={"content-type":"application/json"})
gen = json.load(urllib.request.urlopen(req))["id"]
async def main():
    time.sleep(0.5); r0, a0 = rss(), anon()
    conns = []
    for i in range(n):
        conns.append(await asyncio.open_connection("127.0.0.1", port, local_addr=(f"127.0.0.{2 + i % 250}", 0)))
    await asyncio.sleep(1.5); r1, a1 = rss(), anon()
    for _, w in conns:
        w.write(f"GET /v1/generations/{gen}/events HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await asyncio.sleep(1.5)
    for rd, _ in conns:
        await rd.read(4096)
    await asyncio.sleep(1.0); r2, a2 = rss(), anon()
    print(f"N={n} accepted-only: rss {(r1-r0)/n:.0f} B/conn anon {(a1-a0)/n:.0f}; subscribed (extra): rss {(r2-r1)/n:.0f} B/conn anon {(a2-a1)/n:.0f}; total rss {(r2-r0)/n:.0f} B/conn")
asyncio.run(main())
