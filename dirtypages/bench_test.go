package dirtypages

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"runtime"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// benchRAM is the guest RAM size of the benchmarks: ns/op times four is the
// cost per GiB, and the MB/s column is the rate over RAM.
const benchRAM = 256 << 20

// benchWorkers are the worker counts benchmarked: one, and all processors.
func benchWorkers() []int {
	if n := runtime.GOMAXPROCS(0); n > 1 {
		return []int{1, n}
	}
	return []int{1}
}

// dirtyRandom changes the content of k distinct random pages of mem and
// returns how many it changed.
func dirtyRandom(rng *rand.Rand, mem []byte, k int, gen uint64) int {
	pages := len(mem) / PageSize
	seen := make(map[int]bool, k)
	for len(seen) < k {
		p := rng.IntN(pages)
		seen[p] = true
		writePage(mem, p, int(gen), gen)
	}
	return len(seen)
}

// BenchmarkCompareHarvest measures a Compare harvest of 256 MiB of RAM with
// no dirty page, with 1,000 dirty pages, and the first (full) harvest,
// which copies all of RAM.
func BenchmarkCompareHarvest(b *testing.B) {
	f := newMemfd(b, "dirtypages-bench", benchRAM)
	guest, agent := mapShared(b, f, benchRAM), mapShared(b, f, benchRAM)
	fillPattern(guest)
	// The benchmark functions below run several times (b.N ramps up): the
	// generation must keep growing across runs for writes to change pages.
	rng := rand.New(rand.NewPCG(1, 1))
	gen := uint64(1) << 48
	for _, workers := range benchWorkers() {
		tr, err := NewCompare(agent, Options{Workers: workers})
		if err != nil {
			b.Fatal(err)
		}
		harvest(b, tr)
		for _, dirty := range []int{0, 1000} {
			b.Run(fmt.Sprintf("256MiB/dirty=%d/workers=%d", dirty, workers), func(b *testing.B) {
				b.SetBytes(benchRAM)
				for b.Loop() {
					b.StopTimer()
					gen++
					want := dirtyRandom(rng, guest, dirty, gen)
					b.StartTimer()
					got, err := tr.Harvest(context.Background())
					if err != nil {
						b.Fatal(err)
					}
					if got.Count() != want {
						b.Fatalf("harvest found %d dirty pages, want %d", got.Count(), want)
					}
				}
			})
		}
		b.Run(fmt.Sprintf("256MiB/first/workers=%d", workers), func(b *testing.B) {
			b.SetBytes(benchRAM)
			for b.Loop() {
				tr.h.mu.Lock()
				tr.h.synced = false
				tr.h.mu.Unlock()
				if _, err := tr.Harvest(context.Background()); err != nil {
					b.Fatal(err)
				}
			}
		})
		tr.Close()
	}
}

// BenchmarkPagemapRead measures the pagemap read of SoftDirty's harvest
// (the kernel filling 8 bytes per page, and decoding them) over a 256 MiB
// mapping of this process: with no page mapped in, with 1,000 pages mapped
// in (the pages a guest would have dirtied), and with every page mapped in.
// Reading pagemap works without soft-dirty support; the harvest decodes the
// present bits along with the soft-dirty bits, and the present ones are
// checked here.
func BenchmarkPagemapRead(b *testing.B) {
	f := newMemfd(b, "dirtypages-bench-pagemap", benchRAM)
	for _, resident := range []string{"none", "1000", "all"} {
		// A fresh mapping per case: page tables start empty.
		mem := mapShared(b, f, benchRAM)
		want := 0
		switch resident {
		case "1000":
			want = dirtyRandom(rand.New(rand.NewPCG(2, 2)), mem, 1000, 1)
		case "all":
			fillPattern(mem)
			want = benchRAM / PageSize
		}
		m := Mapping{Start: addrOf(mem), End: addrOf(mem) + benchRAM}
		for _, workers := range benchWorkers() {
			b.Run(fmt.Sprintf("256MiB/resident=%s/workers=%d", resident, workers), func(b *testing.B) {
				src, err := openProc(os.Getpid())
				if err != nil {
					b.Fatal(err)
				}
				sd, err := newSoftDirty(os.Getpid(), m, src, Options{Workers: workers})
				if err != nil {
					b.Fatal(err)
				}
				defer sd.Close()
				b.SetBytes(benchRAM)
				set, dirty := NewSet(sd.Pages()), NewSet(sd.Pages())
				for b.Loop() {
					if err := sd.scan(context.Background(), dirty, set, nil); err != nil {
						b.Fatal(err)
					}
				}
				if set.Count() != want {
					b.Fatalf("%d pages present, want %d", set.Count(), want)
				}
			})
		}
	}
}

// BenchmarkClearRefs measures writing "4" to clear_refs of this process
// with a 256 MiB shared mapping fully mapped in. On a kernel without
// CONFIG_MEM_SOFT_DIRTY this is the page-table walk alone; with it, every
// present entry is also write-protected, and the guest pays one fault per
// page on its next write.
func BenchmarkClearRefs(b *testing.B) {
	mem := mapShared(b, newMemfd(b, "dirtypages-bench-clear", benchRAM), benchRAM)
	fillPattern(mem)
	src, err := openProc(os.Getpid())
	if err != nil {
		b.Fatal(err)
	}
	defer src.Close()
	b.SetBytes(benchRAM)
	for b.Loop() {
		if err := src.ClearSoftDirty(); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkSoftDirtyHarvest measures a whole SoftDirty harvest of a 256 MiB
// mapping of this process (pagemap read and clear_refs) after 0 and 1,000
// pages were written; the timer also covers those writes, whose first
// touch of each page after the clear takes a write-protect fault. It needs
// soft-dirty support.
func BenchmarkSoftDirtyHarvest(b *testing.B) {
	if err := SoftDirtySupported(); err != nil {
		b.Skip(err.Error())
	}
	mem := mapShared(b, newMemfd(b, "dirtypages-bench-sd", benchRAM), benchRAM)
	fillPattern(mem)
	m := Mapping{Start: addrOf(mem), End: addrOf(mem) + benchRAM}
	rng := rand.New(rand.NewPCG(3, 3))
	gen := uint64(1) << 48
	for _, dirty := range []int{0, 1000} {
		b.Run(fmt.Sprintf("256MiB/dirty=%d", dirty), func(b *testing.B) {
			// Without NewSoftDirty's lock check: the mapping is not
			// locked, and nothing reclaims it during the benchmark.
			src, err := openProc(os.Getpid())
			if err != nil {
				b.Fatal(err)
			}
			sd, err := newSoftDirty(os.Getpid(), m, src, Options{})
			if err != nil {
				b.Fatal(err)
			}
			defer sd.Close()
			harvest(b, sd)
			b.SetBytes(benchRAM)
			for b.Loop() {
				gen++
				want := dirtyRandom(rng, mem, dirty, gen)
				got, err := sd.Harvest(context.Background())
				if err != nil {
					b.Fatal(err)
				}
				// The benchmark's own heap is outside the mapping, so the
				// count is exact.
				if got.Count() != want {
					b.Fatalf("harvest found %d dirty pages, want %d", got.Count(), want)
				}
			}
		})
	}
}

// ownUffd is a Uffd tracker of mem, a shared mapping of this process,
// made without injection (the userfaultfd is this process's own), its
// calls returning at most regions regions. It is closed at cleanup.
func ownUffd(b *testing.B, mem []byte, regions int) *Uffd {
	b.Helper()
	m := Mapping{Start: addrOf(mem), End: addrOf(mem) + uintptr(len(mem)), Inode: 1}
	scanner, err := openPagemapScanner(os.Getpid())
	if err != nil {
		b.Fatal(err)
	}
	fd, err := newUserfaultfd()
	if err != nil {
		scanner.Close()
		b.Fatal(err)
	}
	u := &Uffd{pid: os.Getpid(), m: m, pages: m.Pages(), uffd: fd, scanner: scanner, regions: make([]pageRegion, regions)}
	b.Cleanup(func() { u.Close() })
	if err := registerUffd(fd, m); err != nil {
		b.Fatal(err)
	}
	if err := writeProtect(fd, m); err != nil {
		b.Fatal(err)
	}
	return u
}

// BenchmarkUffdHarvest measures a Uffd harvest of a 256 MiB shared mapping
// of this process, every page of it mapped in, after no page, 1,000 random
// pages, every other page (the most regions) and every page were written;
// the writes, which take a write-protect fault each, are outside the
// timer. regions is the output room of one PAGEMAP_SCAN call: the
// tracker's (scanRegions), and 512, the kernel's own buffer.
func BenchmarkUffdHarvest(b *testing.B) {
	if err := UffdSupported(); err != nil {
		b.Skip(err.Error())
	}
	mem := mapShared(b, newMemfd(b, "dirtypages-bench-uffd", benchRAM), benchRAM)
	fillPattern(mem)
	pages := benchRAM / PageSize
	rng := rand.New(rand.NewPCG(5, 5))
	gen := uint64(1) << 48
	for _, regions := range []int{scanRegions, 512} {
		u := ownUffd(b, mem, regions)
		harvest(b, u)
		for _, dirty := range []string{"0", "1000", "half", "all"} {
			b.Run(fmt.Sprintf("256MiB/dirty=%s/regions=%d", dirty, regions), func(b *testing.B) {
				b.SetBytes(benchRAM)
				for b.Loop() {
					b.StopTimer()
					gen++
					want := 0
					switch dirty {
					case "1000":
						want = dirtyRandom(rng, mem, 1000, gen)
					case "half":
						for p := 0; p < pages; p += 2 {
							writePage(mem, p, int(gen), gen)
						}
						want = pages / 2
					case "all":
						for p := range pages {
							writePage(mem, p, int(gen), gen)
						}
						want = pages
					}
					b.StartTimer()
					got, err := u.Harvest(context.Background())
					if err != nil {
						b.Fatal(err)
					}
					if got.Count() != want {
						b.Fatalf("harvest found %d written pages, want %d", got.Count(), want)
					}
				}
			})
		}
		u.Close() // so that the next one can register the mapping
	}
}

// BenchmarkUffdSetup measures what NewUffd does besides the injection on a
// 256 MiB shared mapping of this process, every page mapped in:
// registering it and write-protecting all of it (the guest runs
// meanwhile).
func BenchmarkUffdSetup(b *testing.B) {
	if err := UffdSupported(); err != nil {
		b.Skip(err.Error())
	}
	mem := mapShared(b, newMemfd(b, "dirtypages-bench-uffd-setup", benchRAM), benchRAM)
	fillPattern(mem)
	m := Mapping{Start: addrOf(mem), End: addrOf(mem) + benchRAM, Inode: 1}
	b.SetBytes(benchRAM)
	for b.Loop() {
		fd, err := newUserfaultfd()
		if err != nil {
			b.Fatal(err)
		}
		if err := registerUffd(fd, m); err != nil {
			b.Fatal(err)
		}
		if err := writeProtect(fd, m); err != nil {
			b.Fatal(err)
		}
		unix.Close(fd)
	}
}

// BenchmarkUffdFirstWrite measures what the guest pays while tracked: the
// first write to each of 1,000 write-protected pages (a fault each,
// resolved in the kernel), per write, against a 256 MiB mapping.
func BenchmarkUffdFirstWrite(b *testing.B) {
	if err := UffdSupported(); err != nil {
		b.Skip(err.Error())
	}
	mem := mapShared(b, newMemfd(b, "dirtypages-bench-uffd-write", benchRAM), benchRAM)
	fillPattern(mem)
	u := ownUffd(b, mem, scanRegions)
	harvest(b, u)
	pages := make([]int, 1000)
	rng := rand.New(rand.NewPCG(6, 6))
	for i := range pages {
		pages[i] = rng.IntN(benchRAM / PageSize)
	}
	gen := uint64(1) << 48
	var d time.Duration
	n := 0
	for b.Loop() {
		gen++
		start := time.Now()
		for _, p := range pages {
			writePage(mem, p, int(gen), gen)
		}
		d += time.Since(start)
		n += len(pages)
		b.StopTimer()
		harvest(b, u)
		b.StartTimer()
	}
	b.ReportMetric(float64(d.Nanoseconds())/float64(n), "ns/write")
}

// BenchmarkSetIterate measures walking 1,000 random dirty pages of a 256 MiB
// set, as the checkpoint does to copy them.
func BenchmarkSetIterate(b *testing.B) {
	s := NewSet(benchRAM / PageSize)
	rng := rand.New(rand.NewPCG(4, 4))
	for s.Count() < 1000 {
		s.Add(rng.IntN(s.Len()))
	}
	b.Run("All", func(b *testing.B) {
		for b.Loop() {
			n := 0
			for range s.All() {
				n++
			}
			if n != 1000 {
				b.Fatal(n)
			}
		}
	})
	b.Run("Runs", func(b *testing.B) {
		for b.Loop() {
			n := 0
			for _, k := range s.Runs() {
				n += k
			}
			if n != 1000 {
				b.Fatal(n)
			}
		}
	})
}
