using Akka.Actor;
using ActorVmm.Host;
using ActorVmm.Host.Cluster;
using ActorVmm.Host.Config;
using ActorVmm.Host.Control;
using static Iced.Intel.AssemblerRegisters;

namespace ActorVmm.Bench;

/// <summary>
/// Host memory per VM on a host node: one process (a real host node: cluster actor system, node
/// actor, placement) starts <c>vms</c> idle 1-vcpu VMs of 16 MiB through its node actor, the way
/// `ctl run` does, and the process's resident memory is read from /proc/self/status before and after.
/// Guest RAM is a memfd (RssShmem); what the VMM itself costs is the rest (RssAnon + RssFile). One VM
/// is started and left running before the baseline, so code loaded and compiled at the first VM counts
/// as the node's, not as a VM's. Goal: ≤ 5 MiB beyond guest RAM per VM (Firecracker's figure for a whole
/// microVM process).
/// </summary>
internal static class HostMemoryBench
{
    private const string MemorySize = "16M";

    public static async Task<int> RunAsync(int vms)
    {
        if (!BenchGuest.KvmAvailable()) return 2;
        var dir = Directory.CreateTempSubdirectory("actorvmm-hostmem-bench-");
        try
        {
            // The idle guest: interrupts on, halted; nothing wakes it.
            var guest = Path.Combine(dir.FullName, "idle.bin");
            var a = new Iced.Intel.Assembler(16);
            var idle = a.CreateLabel();
            a.Label(ref idle);
            a.sti();
            a.hlt();
            a.jmp(idle);
            await File.WriteAllBytesAsync(guest, ActorVmm.Host.Guests.GuestCode.Assemble(a, 0x7C00));

            var config = ConfigValues.From([new("actorvmm.control.directory", Path.Combine(dir.FullName, "host"))]).WithFallback(VmConfig.Load(null));
            HostRunner.ConfigureLogging();
            var system = HostRunner.CreateSystem(config, ControlClient.HostSystemName, cluster: true);
            var up = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
            Akka.Cluster.Cluster.Get(system).RegisterOnMemberUp(() => up.TrySetResult());
            var node = HostNode.Start(system, config, []);
            await up.Task.WaitAsync(TimeSpan.FromMinutes(2));

            NodeProtocol.Setting[] Settings() =>
            [
                new("actorvmm.vm.memory", MemorySize), new("actorvmm.vm.boot.flat", guest), new("actorvmm.vm.serial.input", "none"),
            ];
            async Task Start(string name)
            {
                var answer = await node.Ask<object>(new NodeProtocol.StartVm(name, Settings()), TimeSpan.FromMinutes(5));
                if (answer is NodeProtocol.RunRefused r) throw new InvalidOperationException($"{name}: {r.Why}");
            }

            await Start("warm-up");
            var before = Settle();
            var started = DateTime.UtcNow;
            for (var i = 0; i < vms; i++) await Start($"idle-{i}");
            var elapsed = DateTime.UtcNow - started;
            var after = Settle();
            double PerVm(long b, long e) => (e - b) / (double)vms / (1 << 20);
            Console.WriteLine($"host memory per VM: {vms} idle 1-vcpu VMs of {MemorySize} in one host node (started in {elapsed.TotalSeconds:0.0} s)");
            Console.WriteLine($"  beyond guest RAM (RssAnon + RssFile): {PerVm(before.Anon + before.File, after.Anon + after.File):0.00} MiB per VM (goal <= 5)");
            Console.WriteLine($"    anonymous {PerVm(before.Anon, after.Anon):0.00} MiB, file-backed {PerVm(before.File, after.File):0.00} MiB; " +
                              $"threads {before.Threads} -> {after.Threads}");
            Console.WriteLine($"  guest RAM resident (RssShmem): {PerVm(before.Shmem, after.Shmem):0.00} MiB per VM");
            await node.Ask<NodeActor.AllStopped>(NodeActor.StopAll.Instance, TimeSpan.FromMinutes(5));
            await system.Terminate();
            return 0;
        }
        finally { dir.Delete(recursive: true); }
    }

    private sealed record Rss(long Anon, long File, long Shmem, int Threads);

    /// <summary>Resident memory after garbage collection and a pause for the VMs to go idle.</summary>
    private static Rss Settle()
    {
        Thread.Sleep(2000);
        GC.Collect(2, GCCollectionMode.Aggressive, blocking: true, compacting: true);
        GC.WaitForPendingFinalizers();
        Thread.Sleep(500);
        long Kib(string[] lines, string key) =>
            long.Parse(lines.First(l => l.StartsWith(key + ":", StringComparison.Ordinal)).Split(' ', StringSplitOptions.RemoveEmptyEntries)[1]) << 10;
        var status = File.ReadAllLines("/proc/self/status");
        return new Rss(Kib(status, "RssAnon"), Kib(status, "RssFile"), Kib(status, "RssShmem"),
            int.Parse(status.First(l => l.StartsWith("Threads:", StringComparison.Ordinal)).Split('\t', ' ').Last(s => s.Length > 0)));
    }
}
