"""Hit rates of a RAM expert tier under a VRAM tier, simulated (python3 tools/sim/tier_policies.py).

One sparse layer of moe30b under uniform routing: 128 experts, 8 per token, a VRAM cache of V
slots (LRU) over a RAM cache of R slots, 20,000 tokens. Prints (V, R, RAM policy, VRAM hit rate,
RAM hit rate per VRAM miss) for three RAM policies:
- inclusive: LRU touched on misses in VRAM (flowgate before the demote rule);
- demote: an expert copied up goes to the LRU end of RAM, one VRAM evicts to the MRU end if
  still in RAM (flowgate's `HostExpertCache::demote` / `kept_below`);
- exclusive: every VRAM victim written back into RAM (not built).
V=55, R=50 is 8 GiB of VRAM over 6 GiB of RAM per layer; V=14, R=84 is 3 GiB over 10 GiB;
V=55, R=84 is 8 GiB over 10 GiB (docs/benchmarks.md, "Three tiers").
"""
import random
from collections import OrderedDict
def sim(N,V,R,k,T,mode,seed=1):
    rnd=random.Random(seed)
    vram=OrderedDict(); ram=OrderedDict()
    vh=rh=rm=0
    for t in range(T):
        ex=rnd.sample(range(N),k)
        for e in ex:
            if e in vram:
                vram.move_to_end(e); vh+=1; continue
            # vram miss
            if e in ram:
                rh+=1
                if mode=='inclusive': ram.move_to_end(e)
                elif mode in ('demote','exclusive'):
                    ram.move_to_end(e,last=False)  # LRU position
                    if mode=='exclusive': del ram[e]
            else:
                rm+=1
                if mode=='inclusive':
                    ram[e]=1
                    if len(ram)>R: ram.popitem(last=False)
                elif mode=='demote':
                    ram[e]=1; ram.move_to_end(e,last=False)
                    if len(ram)>R: 
                        # evict LRU but not the one just read
                        for x in ram:
                            if x!=e: del ram[x]; break
                # exclusive: read straight to vram
            vram[e]=1
            if len(vram)>V:
                v,_=vram.popitem(last=False)
                if mode=='demote' and v in ram: ram.move_to_end(v)
                if mode=='exclusive':
                    ram[v]=1
                    if len(ram)>R: ram.popitem(last=False)
    n=T*k
    return vh/n, rh/max(1,rh+rm)
for (V,R) in [(55,50),(14,84),(55,84)]:
    for m in ['inclusive','demote','exclusive']:
        print(V,R,m, ["%.3f"%x for x in sim(128,V,R,8,20000,m)])
