using System.Diagnostics;
using System.Globalization;
using Akka.Actor;
using ActorVmm.Host;
using ActorVmm.Host.Config;
using ActorVmm.Host.Guests;
using ActorVmm.Host.Vm;

namespace ActorVmm.Bench;

/// <summary>
/// Snapshot and restore latency of a 1-vcpu, 128 MiB guest that has touched 16 MiB
/// (<see cref="CountingGuest"/>: it counts timer ticks on COM1 and rewrites a 256 KiB region).
/// <list type="bullet">
/// <item>snapshot: `TakeSnapshot` to the VM actor until the manifest is written, and how long the
/// guest was paused meanwhile (the VM is stopped after each, as `ctl snapshot --stop`);</item>
/// <item>restore: `actorvmm run --restore` as a new process, lazy (pages on first touch) and eager,
/// from just before the process is started: to its entry point (.NET start-up, reported apart),
/// to the first guest instruction (the first KVM_RUN of a vcpu) and to the guest's first output
/// after the restore. The VMM's own work is first instruction minus main.</item>
/// </list>
/// Firecracker publishes its snapshot restore (load) latency as 4 to 158 ms on x86, by host kernel
/// and CPU (docs/snapshotting, its CI's restore-latency tests); the goal here is under 50 ms of VMM
/// work to the first instruction.
/// </summary>
internal static class SnapshotBench
{
    private const ulong Memory = 128UL << 20;
    private const ulong Touched = 16UL << 20;
    /// <summary>The guest counts to this, one number every <see cref="Tick"/> ns, then checks its memory and exits
    /// (status 1): snapshotted after its first numbers, the restored copy ends on its own.</summary>
    private const int Limit = 60;
    private const uint Tick = 5_000_000;

    public static async Task<int> RunAsync(int runs)
    {
        if (!BenchGuest.KvmAvailable()) return 2;
        var dir = Directory.CreateTempSubdirectory("actorvmm-snapshot-bench-");
        try
        {
            var snapshots = new List<(double Total, double Paused, long Pages)>();
            var lazy = new List<IReadOnlyDictionary<string, double>>();
            var eager = new List<IReadOnlyDictionary<string, double>>();
            for (var i = 0; i <= runs; i++)
            {
                var path = Path.Combine(dir.FullName, $"snap-{i}");
                var taken = await TakeAsync(path);
                var restoredLazy = await RestoreAsync(path, eager: false);
                var restoredEager = await RestoreAsync(path, eager: true);
                Directory.Delete(path, recursive: true);
                if (i == 0) continue; // untimed: the first run reads the files from disk
                snapshots.Add((taken.Total.TotalMilliseconds, taken.Paused.TotalMilliseconds, taken.MemoryPages));
                lazy.Add(restoredLazy);
                eager.Add(restoredEager);
            }
            Console.WriteLine($"snapshot/restore: 1 vcpu, {Memory >> 20} MiB, {Touched >> 20} MiB touched, emulated local APIC; {runs} runs, medians (min-max)");
            Console.WriteLine($"  snapshot (request to manifest written) {Stat(snapshots.Select(s => s.Total))} ms; guest paused " +
                              $"{Stat(snapshots.Select(s => s.Paused))} ms; {snapshots[0].Pages} pages written ({snapshots[0].Pages * 4 >> 10} MiB)");
            foreach (var (name, results) in new[] { ("lazy", lazy), ("eager", eager) })
            {
                string Of(string milestone) => Stat(results.Select(r => r.GetValueOrDefault(milestone, double.NaN)));
                var work = results.Select(r => r.GetValueOrDefault("first instruction", double.NaN) - r.GetValueOrDefault("main", double.NaN));
                Console.WriteLine($"  restore {name,-5}: .NET start to main {Of("main")} ms; to first instruction {Of("first instruction")} ms " +
                                  $"(VMM work {Stat(work)} ms, goal < 50); to first output {Of("first output")} ms");
                // Where the time goes: each milestone's median, in the order they came.
                var milestones = results.SelectMany(r => r.Keys).Distinct()
                    .Select(m => (Name: m, Median: Median(results.Where(r => r.ContainsKey(m)).Select(r => r[m]))))
                    .OrderBy(m => m.Median);
                Console.WriteLine("    milestones (medians, ms from the process start): " +
                                  string.Join(", ", milestones.Select(m => string.Create(CultureInfo.InvariantCulture, $"{m.Name} {m.Median:F1}"))));
            }
            Console.WriteLine("  Firecracker (published, x86): snapshot restore 4-158 ms depending on host kernel and CPU");
            return 0;
        }
        finally
        {
            dir.Delete(recursive: true);
        }
    }

    private static async Task<VmProtocol.SnapshotTaken> TakeAsync(string path)
    {
        var system = HostRunner.CreateSystem(VmConfig.Load(null), "bench");
        try
        {
            using var console = SerialConsole.Captured();
            var spec = new VmSpec("bench", Memory, 1, CountingGuest.Build(Limit, Tick, Touched));
            await using var vm = new VmBuilder(system, spec).WithStandardDevices(console).Start();
            var deadline = DateTime.UtcNow.AddMinutes(2);
            while (console.BytesWritten < 20 && DateTime.UtcNow < deadline) await Task.Delay(1);
            var answer = await vm.Actor.Ask<VmProtocol.IVmMessage>(new VmProtocol.TakeSnapshot(path, StopAfter: true), TimeSpan.FromMinutes(2));
            await vm.Ended;
            return answer as VmProtocol.SnapshotTaken ?? throw new InvalidOperationException($"no snapshot: {answer}");
        }
        finally
        {
            await system.Terminate();
        }
    }

    /// <summary>One restore in a new process, which the guest ends once it counted to its limit; its milestones.</summary>
    private static async Task<IReadOnlyDictionary<string, double>> RestoreAsync(string snapshot, bool eager)
    {
        var host = StartupBench.HostExecutable() ?? throw new InvalidOperationException("build the solution first: the host executable is missing");
        var start = new ProcessStartInfo(host)
        {
            RedirectStandardInput = true,
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            UseShellExecute = false,
        };
        foreach (var a in (string[])["run", "--restore", snapshot, "--timeout", "600"]) start.ArgumentList.Add(a);
        if (eager) start.ArgumentList.Add("--restore-eager");
        var origin = Stopwatch.GetTimestamp();
        start.Environment[StartupTimes.Variable] = "@" + origin.ToString(CultureInfo.InvariantCulture);
        using var process = Process.Start(start)!;
        process.StandardInput.Close();
        var stdout = process.StandardOutput.ReadToEndAsync();
        var stderr = process.StandardError.ReadToEndAsync();
        using var cts = new CancellationTokenSource(TimeSpan.FromMinutes(5));
        await process.WaitForExitAsync(cts.Token);
        var (output, errors) = (await stdout, await stderr);
        if (process.ExitCode != ((CountingGuest.SumOk << 1) | 1) || !output.EndsWith("sum ok\n", StringComparison.Ordinal))
            throw new InvalidOperationException($"the restored guest did not go on to its end (exit code {process.ExitCode}):\n{output}\n{errors}");
        return StartupBench.Milestones(errors);
    }

    private static double Median(IEnumerable<double> values)
    {
        var sorted = values.Order().ToArray();
        return sorted.Length % 2 == 1 ? sorted[sorted.Length / 2] : (sorted[sorted.Length / 2 - 1] + sorted[sorted.Length / 2]) / 2;
    }

    private static string Stat(IEnumerable<double> values)
    {
        var sorted = values.Where(v => !double.IsNaN(v)).Order().ToArray();
        if (sorted.Length == 0) return "n/a";
        var median = sorted.Length % 2 == 1 ? sorted[sorted.Length / 2] : (sorted[sorted.Length / 2 - 1] + sorted[sorted.Length / 2]) / 2;
        return string.Create(CultureInfo.InvariantCulture, $"{median:F1} ({sorted[0]:F1}-{sorted[^1]:F1})");
    }
}
