using System.Diagnostics;
using System.Runtime.InteropServices;
using Akka.Actor;
using ActorVmm.Host;
using ActorVmm.Host.Config;
using ActorVmm.LibVmm;
using ActorVmm.Memory;

namespace ActorVmm.Bench;

/// <summary>
/// Nested page faults resolved per second: the same workload — a thread writing one byte to each
/// of N fresh guest pages through the guest view — resolved (a) by a raw userfaultfd loop that
/// answers each MISSING fault with UFFDIO_ZEROPAGE on its reader thread (no actors: the limit) and
/// (b) by the VmspaceActor (reader thread → NestedPageFault message → actor → pmap → ioctl).
/// The toucher writes through libc memset, as a vcpu inside KVM_RUN does not run managed code.
/// Without /dev/kvm the toucher is a host thread; the kernel path of the fault is the same one a
/// vcpu's EPT violation takes through get_user_pages.
/// </summary>
internal static partial class FaultBench
{
    private const int Page = 4096;

    [LibraryImport("libc", EntryPoint = "memset")]
    private static partial nint Memset(nint destination, int value, nuint length);

    public static async Task<int> RunAsync(int pages, int reps)
    {
        Console.WriteLine($"nested page faults: {pages} fresh pages written once each, best of {reps}");
        var raw = double.MaxValue;
        var actor = double.MaxValue;
        long rawFaults = 0, actorFaults = 0;
        for (var i = 0; i < reps; i++)
        {
            var (t, f) = Raw(pages);
            if (t < raw) (raw, rawFaults) = (t, f);
            var (ta, fa) = await Actor(pages);
            if (ta < actor) (actor, actorFaults) = (ta, fa);
        }
        var rawPer = raw * 1000 / rawFaults;
        var actorPer = actor * 1000 / actorFaults;
        Console.WriteLine($"{"",-8}{"ms",10}{"faults",10}{"µs/fault",12}{"faults/s",12}");
        Console.WriteLine($"{"raw",-8}{raw,10:F1}{rawFaults,10}{rawPer,12:F2}{rawFaults / raw * 1000,12:F0}");
        Console.WriteLine($"{"actor",-8}{actor,10:F1}{actorFaults,10}{actorPer,12:F2}{actorFaults / actor * 1000,12:F0}");
        Console.WriteLine($"ratio b/a (time per fault): {actorPer / rawPer:F2}   goal: <= 1.5");
        return 0;
    }

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

    private static (double Ms, long Faults) Raw(int pages)
    {
        using var region = new MemfdRegion("bench", (ulong)pages * Page);
        using var uffd = Userfaultfd.Create();
        uffd.Register(region.GuestView, region.Size, UffdRegisterMode.Missing);
        long faults = 0;
        Exception? error = null;
        using (new UffdReader(uffd, f =>
               {
                   faults++;
                   uffd.ZeroPage((nint)(f.Address & ~(ulong)(Page - 1)), Page);
               }, e => error = e, "raw-uffd"))
        {
            var ms = Touch(region.GuestView, pages);
            if (error is not null) throw error;
            uffd.Unregister(region.GuestView, region.Size);
            return (ms, faults);
        }
    }

    private static async Task<(double Ms, long Faults)> Actor(int pages)
    {
        var system = HostRunner.CreateSystem(VmConfig.Load(null), "bench-faults");
        var memory = VmspaceLayout.Build((ulong)pages * Page);
        try
        {
            var props = VmspaceProtocol.Props(memory, VmspaceOptions.Paged(), ActorRefs.Nobody);
            // As in a VM with demand paging (VmActor), the vmspace has a thread of its own; the
            // thread pool for comparison with BENCH_VMSPACE_POOL=1.
            if (Environment.GetEnvironmentVariable("BENCH_VMSPACE_POOL") != "1") props = props.WithDispatcher("actorvmm.vcpu-dispatcher");
            var vmspace = system.ActorOf(props, "vmspace");
            var before = await vmspace.Ask<VmspaceProtocol.Stats>(VmspaceProtocol.GetStats.Instance, TimeSpan.FromSeconds(10));
            if (!before.Paging.Enabled) throw new InvalidOperationException($"userfaultfd is off: {before.Paging.Features}");
            var ms = Touch(memory.Segments[0].Backing.GuestView + (nint)memory.Segments[0].BackingOffset, pages);
            var after = await vmspace.Ask<VmspaceProtocol.Stats>(VmspaceProtocol.GetStats.Instance, TimeSpan.FromSeconds(10));
            var faults = after.Paging.MissingFaults + after.Paging.MinorFaults + after.Paging.WriteProtectFaults
                         - (before.Paging.MissingFaults + before.Paging.MinorFaults + before.Paging.WriteProtectFaults);
            await vmspace.GracefulStop(TimeSpan.FromSeconds(10));
            return (ms, faults);
        }
        finally
        {
            await system.Terminate();
            memory.Dispose();
        }
    }
}
