using System.Diagnostics;
using System.Runtime.InteropServices;
using Akka.Actor;
using ActorVmm.Host;
using ActorVmm.Host.Boot;
using ActorVmm.Host.Config;
using ActorVmm.Host.Vm;
using ActorVmm.LibVmm;
using ActorVmm.Memory;
using Iced.Intel;
using static Iced.Intel.AssemblerRegisters;

namespace ActorVmm.Bench;

/// <summary>
/// Nested page faults resolved per second, (a) by a raw userfaultfd loop that answers each MISSING
/// fault with UFFDIO_ZEROPAGE on its reader thread (no actors: the limit) and (b) by the
/// VmspaceActor (reader thread → NestedPageFault message → actor → pmap → ioctl), in two modes:
/// <list type="bullet">
/// <item>host thread: a host thread writes one byte to each of N fresh pages through the guest
/// view, with libc memset (a thread faulting in managed code would deadlock the GC, see
/// <see cref="Userfaultfd"/>); the kernel path of the fault is the one a vcpu's nested page fault
/// takes through get_user_pages, without the VM exit.</item>
/// <item>guest: the same real guest writes one qword to each of N fresh pages (4 KiB apart), then
/// does it again over the same pages, now present; it marks the start, the middle and the end.
/// (a) is a VM built with LibVmm only, its vcpu in a plain KVM_RUN loop on its own thread; (b) a
/// VM with <see cref="VmspaceOptions.Paged"/> demand paging. Time per fault = (first pass −
/// second pass) / faults, so the guest's own instructions are subtracted.</item>
/// </list>
/// </summary>
internal static partial class FaultBench
{
    private const int Page = 4096;
    // The guest touches pages from 4 MiB on: above its code, boot page tables and stack, which the
    // loader wrote (resident: they never take a MISSING fault, and are touched before the first mark).
    private const ulong TouchBase = 0x40_0000;
    private static readonly TimeSpan Ask = TimeSpan.FromSeconds(10);

    [LibraryImport("libc", EntryPoint = "memset")]
    private static partial nint Memset(nint destination, int value, nuint length);

    /// <summary>One measured run: milliseconds of the faulting pass, of the same pass over present
    /// pages (0: none), and the MISSING faults counted.</summary>
    private sealed record FaultRun(double FaultMs, double PresentMs, long Faults)
    {
        public double MicrosecondsPerFault => (FaultMs - PresentMs) * 1000 / Faults;
    }

    /// <summary>The vmspace on the thread pool instead of a thread of its own (as in a VM with demand paging).</summary>
    private static bool OnThreadPool => Environment.GetEnvironmentVariable("BENCH_VMSPACE_POOL") == "1";

    public static async Task<int> RunAsync(int pages, int reps, string mode)
    {
        if (mode is not ("host" or "guest" or "both"))
        {
            Console.Error.WriteLine($"actorvmm-bench: faults mode must be host, guest or both, not {mode}");
            return 2;
        }
        HostRunner.ConfigureLogging();
        Console.WriteLine($"nested page faults: {pages} fresh pages written once each, best of {reps}; " +
                          $"vmspace on {(OnThreadPool ? "the thread pool" : "a thread of its own")}");
        if (mode is "host" or "both")
        {
            Console.WriteLine("host thread: memset of one byte per page through the guest view");
            await CompareAsync(reps, () => Task.FromResult(RawHostThread(pages)), () => ActorHostThread(pages));
        }
        if (mode is "guest" or "both")
        {
            if (!BenchGuest.KvmAvailable()) return 2;
            Console.WriteLine("guest: one qword write per page, minus the same loop over the pages once present");
            var image = Toucher(pages);
            var ram = VmspaceLayout.AlignUp(TouchBase + (ulong)pages * Page + (1 << 20));
            await CompareAsync(reps, () => Task.FromResult(RawGuest(image, ram)), () => ActorGuest(image, ram));
        }
        return 0;
    }

    /// <summary>Runs raw and actor <paramref name="reps"/> times each (alternating) and prints the best
    /// run of each (least time per fault) and their ratio.</summary>
    private static async Task CompareAsync(int reps, Func<Task<FaultRun>> raw, Func<Task<FaultRun>> actor)
    {
        FaultRun? bestRaw = null, bestActor = null;
        static FaultRun Best(FaultRun? best, FaultRun run) =>
            best is null || run.MicrosecondsPerFault < best.MicrosecondsPerFault ? run : best;
        for (var i = 0; i < reps; i++)
        {
            bestRaw = Best(bestRaw, await raw());
            bestActor = Best(bestActor, await actor());
        }
        Console.WriteLine($"  {"",-8}{"ms",10}{"present ms",12}{"faults",10}{"µs/fault",12}{"faults/s",12}");
        foreach (var (name, r) in new[] { ("raw", bestRaw!), ("actor", bestActor!) })
            Console.WriteLine($"  {name,-8}{r.FaultMs,10:F1}{r.PresentMs,12:F1}{r.Faults,10}{r.MicrosecondsPerFault,12:F2}{1e6 / r.MicrosecondsPerFault,12:F0}");
        Console.WriteLine($"  ratio b/a (time per fault): {bestActor!.MicrosecondsPerFault / bestRaw!.MicrosecondsPerFault:F2}   goal: <= 1.5");
    }

    // ---- (a) the raw loop ---------------------------------------------------------------

    /// <summary>
    /// The raw loop's pager: <paramref name="view"/> registered MISSING with a userfaultfd, whose
    /// reader thread answers every fault with UFFDIO_ZEROPAGE and counts those at or above
    /// <paramref name="countFrom"/>.
    /// </summary>
    private sealed class RawPager : IDisposable
    {
        private readonly Userfaultfd _uffd;
        private readonly UffdReader _reader;
        private readonly nint _view;
        private readonly ulong _length;
        private long _faults;
        private Exception? _error;

        public RawPager(nint view, ulong length, nint countFrom)
        {
            (_view, _length) = (view, length);
            _uffd = Userfaultfd.Create();
            _uffd.Register(view, length, UffdRegisterMode.Missing);
            _reader = new UffdReader(_uffd, f =>
            {
                if (f.Address >= (ulong)countFrom) _faults++;
                _uffd.ZeroPage((nint)(f.Address & ~(ulong)(Page - 1)), Page);
            }, e => _error = e, "raw-uffd");
        }

        /// <summary>The faults counted; throws what the reader failed with, if it did.</summary>
        public long Faults => _error is null ? Interlocked.Read(ref _faults) : throw new InvalidOperationException("the raw reader failed", _error);

        public void Dispose()
        {
            _reader.Dispose();
            _uffd.Unregister(_view, _length);
            _uffd.Dispose();
        }
    }

    private static FaultRun RawHostThread(int pages)
    {
        using var region = new MemfdRegion("bench", (ulong)pages * Page);
        using var pager = new RawPager(region.GuestView, region.Size, region.GuestView);
        var ms = Touch(region.GuestView, pages);
        return new FaultRun(ms, 0, pager.Faults);
    }

    /// <summary>The guest in a VM built with LibVmm only: its vcpu runs on a thread of its own until the
    /// guest's debug-exit, the marks timed as the loop handles their exits.</summary>
    private static FaultRun RawGuest(LongModeImage image, ulong ram)
    {
        using var vm = new RawVm(image, ram);
        var segment = vm.Memory.Segments.Single(s => s.Base.Value == 0);
        var view = segment.Backing.GuestView + (nint)segment.BackingOffset;
        using var pager = new RawPager(view, segment.Size, view + (nint)TouchBase);
        var marks = new Marks();
        Exception? error = null;
        var vcpu = new Thread(() =>
        {
            try
            {
                vm.Run(run =>
                {
                    if (run.IoPort == BenchGuest.MarkPort) marks.Write(0, 1, run.IoData[0]);
                    return run.IoPort != BenchGuest.DebugExitPort;
                });
            }
            catch (Exception e)
            {
                error = e;
            }
        }) { IsBackground = true, Name = "raw-vcpu" };
        vcpu.Start();
        if (!vcpu.Join(TimeSpan.FromMinutes(10))) throw new TimeoutException("the raw guest did not finish");
        if (error is not null) throw new InvalidOperationException("the raw guest failed", error);
        return GuestRun(marks, pager.Faults);
    }

    // ---- (b) ActorVmm -------------------------------------------------------------------

    private static async Task<FaultRun> ActorHostThread(int pages)
    {
        var system = HostRunner.CreateSystem(VmConfig.Load(null), "bench-faults");
        var memory = VmspaceLayout.Build((ulong)pages * Page);
        try
        {
            var props = VmspaceProtocol.Props(memory, VmspaceOptions.Paged(), ActorRefs.Nobody);
            // As in a VM with demand paging (VmActor), the vmspace has a thread of its own.
            if (!OnThreadPool) props = props.WithDispatcher("actorvmm.vcpu-dispatcher");
            var vmspace = system.ActorOf(props, "vmspace");
            var before = await Paging(vmspace);
            if (!before.Enabled) throw new InvalidOperationException($"userfaultfd is off: {before.Features}");
            var ms = Touch(memory.Segments[0].Backing.GuestView + (nint)memory.Segments[0].BackingOffset, pages);
            var after = await Paging(vmspace);
            await vmspace.GracefulStop(Ask);
            return new FaultRun(ms, 0, after.MissingFaults - before.MissingFaults);
        }
        finally
        {
            await system.Terminate();
            memory.Dispose();
        }
    }

    /// <summary>The guest in an ActorVmm VM with demand paging. Its MISSING faults are all in the touched
    /// range (everything else it touches the loader wrote); the vmspace's counters give them.</summary>
    private static async Task<FaultRun> ActorGuest(LongModeImage image, ulong ram)
    {
        // A paged VM gives its vmspace a thread of its own; a deployment (it overrides Props) moves
        // the vmspace of any VM to the pool.
        var config = OnThreadPool
            ? Akka.Configuration.ConfigurationFactory.ParseString(
                """akka.actor.deployment { "/*/vmspace" { dispatcher = akka.actor.default-dispatcher } }""").WithFallback(VmConfig.Load(null))
            : null;
        var (marks, paging) = await BenchGuest.RunAsync(new VmSpec("bench-faults", ram, 1, image, Paging: VmspaceOptions.Paged()),
            async (system, vm) => await Paging(await system.ActorSelection(vm.Actor.Path / "vmspace").ResolveOne(Ask)), config);
        return GuestRun(marks, paging.MissingFaults);
    }

    // ---- shared --------------------------------------------------------------------------

    private static async Task<VmspaceProtocol.PagingStats> Paging(IActorRef vmspace) =>
        (await vmspace.Ask<VmspaceProtocol.Stats>(VmspaceProtocol.GetStats.Instance, Ask)).Paging;

    /// <summary>Writes one byte to each page from a host thread (native memset) and returns the milliseconds it took.</summary>
    private static double Touch(nint view, int pages)
    {
        var sw = Stopwatch.StartNew();
        var toucher = new Thread(() =>
        {
            for (var p = 0; p < pages; p++) Memset(view + p * Page, 1, 1);
        }) { Name = "toucher" };
        toucher.Start();
        if (!toucher.Join(TimeSpan.FromMinutes(2))) throw new TimeoutException("the toucher did not finish");
        return sw.Elapsed.TotalMilliseconds;
    }

    /// <summary>Mark 1 → 2: the faulting pass; 2 → 3: the same pass over present pages.</summary>
    private static FaultRun GuestRun(Marks marks, long faults) => new(marks.Milliseconds(1, 2), marks.Milliseconds(2, 3), faults);

    /// <summary>The guest: mark 1, touch the pages (each faults), mark 2, touch them again (none
    /// faults), mark 3, debug-exit. Its code fits in one page, which the loader wrote: the first
    /// instruction maps it (a MINOR fault under ActorVmm), before mark 1.</summary>
    private static LongModeImage Toucher(int pages) => BenchGuest.Long(a =>
    {
        BenchGuest.Mark(a, 1);
        TouchLoop(a, pages);
        BenchGuest.Mark(a, 2);
        TouchLoop(a, pages);
        BenchGuest.Mark(a, 3);
        BenchGuest.ExitOk(a);
    });

    private static void TouchLoop(Assembler a, int pages)
    {
        var loop = a.CreateLabel();
        a.mov(rsi, TouchBase);
        a.mov(ecx, pages);
        a.Label(ref loop);
        a.mov(__qword_ptr[rsi], rsi);
        a.add(rsi, Page);
        a.dec(ecx);
        a.jnz(loop);
    }
}
