using System.Diagnostics;
using Akka.Actor;
using ActorVmm.Host;
using ActorVmm.Host.Config;
using ActorVmm.Host.Control;
using ActorVmm.Host.Guests;
using ActorVmm.Host.Snapshot;
using ActorVmm.Host.Vm;
using ActorVmm.Memory;
using ActorVmm.Testing;
using Xunit;

namespace ActorVmm.Integration.Tests;

/// <summary>
/// A running guest is snapshotted, its process's VM ends, and it is restored in a NEW host process
/// (`actorvmm run --restore`): the guest (<see cref="CountingGuest"/>) must continue exactly where it
/// stopped, which it checks itself. Its numbers on COM1 before the snapshot and after the restore
/// join with no gap and no repeat; its memory checksum (kept in a register, recomputed from memory at
/// the end) matches; with 2 vcpus the second one's count never goes back and still moves.
/// </summary>
public sealed class SnapshotGuestTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("actorvmm-snapshot-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    private const int Limit = 60;
    private const int SnapshotAfter = 12;
    /// <summary>20 ms a number: the guest runs for more than a second, so a snapshot asked for at
    /// <see cref="SnapshotAfter"/> finds it running on a fast host too.</summary>
    private const uint Tick = 20_000_000;
    /// <summary>How far the snapshotted-while-running guests count: 2 s of guest time, so the ask that
    /// follows number <see cref="SnapshotAfter"/> still finds the guest running when the host takes over
    /// a second to act on it (an emulated machine under load; the guest's ticks are wall-clock time).</summary>
    private const int RunningLimit = 100;

    public static TheoryData<LapicMode, int, bool, bool> Machines => new()
    {
        // lapic, vcpus, demand paging, eager restore
        { LapicMode.Emulated, 1, false, false },
        { LapicMode.Assisted, 1, false, false },
        { LapicMode.Emulated, 2, true, false },
        { LapicMode.Assisted, 2, true, false },
        { LapicMode.Emulated, 1, true, true },
    };

    [KvmTheory]
    [MemberData(nameof(Machines))]
    public async Task A_guest_snapshotted_and_restored_in_a_new_process_continues_where_it_stopped(LapicMode lapic, int cpus,
        bool paging, bool eager)
    {
        var image = CountingGuest.Build(RunningLimit, Tick, cpus: cpus);
        var spec = new VmSpec("counter", 32 << 20, cpus, image, lapic, paging ? VmspaceOptions.Paged() : null);
        var snapshot = Path.Combine(_dir, "snap");
        string before;
        await using (var run = await GuestRun.StartAsync(spec))
        {
            Assert.True(await run.WaitForSerialAsync(Encoding(SnapshotAfter).Length), $"the guest did not count to {SnapshotAfter}: {run.Serial}");
            var answer = await run.Vm.Actor.Ask<VmProtocol.IVmMessage>(new VmProtocol.TakeSnapshot(snapshot, StopAfter: true),
                TimeSpan.FromMinutes(3));
            if (answer is VmProtocol.SnapshotFailed failed)
            {
                // How the guest got there: counted to its limit before the host acted (too slow a host), or not.
                var ended = await run.Vm.Ended.WaitAsync(TimeSpan.FromSeconds(30));
                Assert.Fail($"the snapshot failed: {failed.Reason}; the VM ended: {ended.Kind}, {ended.Detail}; the guest printed:\n{run.Serial}");
            }
            var taken = Assert.IsType<VmProtocol.SnapshotTaken>(answer);
            Assert.True(taken.Stopped);
            var outcome = await run.WaitAsync();
            Assert.Equal(VmProtocol.OutcomeKind.Stopped, outcome.Kind);
            before = run.Serial;
        }
        Assert.DoesNotContain("sum", before);

        var serial = Path.Combine(_dir, "serial.txt");
        var args = new List<string> { "run", "--restore", snapshot, "--serial", serial, "--timeout", "240" };
        if (eager) args.Add("--restore-eager");
        var (code, _, err) = await ActorVmmProcess.RunAsync(TimeSpan.FromMinutes(5), [.. args]);
        var after = File.ReadAllText(serial);

        var text = before + after;
        Assert.True(code == ((CountingGuest.SumOk << 1) | 1), $"exit code {code}; serial:\n{text}\nstderr:\n{err}");
        Assert.EndsWith("sum ok\n", text);
        var numbers = text[..^"sum ok\n".Length].Split('\n', StringSplitOptions.RemoveEmptyEntries).Select(int.Parse).ToArray();
        Assert.Equal(Enumerable.Range(1, RunningLimit), numbers); // no gap, no repeat, across the restore
        Assert.NotEmpty(after);
    }

    [KvmFact]
    public async Task A_snapshot_into_a_directory_that_is_not_empty_is_refused_and_the_guest_goes_on()
    {
        var spec = new VmSpec("counter", 32 << 20, 1, CountingGuest.Build(Limit, Tick), LapicMode.Emulated);
        var occupied = Path.Combine(_dir, "occupied");
        Directory.CreateDirectory(occupied);
        File.WriteAllText(Path.Combine(occupied, "keep.txt"), "mine");
        await using var run = await GuestRun.StartAsync(spec);
        Assert.True(await run.WaitForSerialAsync(Encoding(3).Length));

        var answer = await run.Vm.Actor.Ask<VmProtocol.IVmMessage>(new VmProtocol.TakeSnapshot(occupied), TimeSpan.FromMinutes(1));
        var failed = Assert.IsType<VmProtocol.SnapshotFailed>(answer);
        Assert.Contains("not empty", failed.Reason);
        Assert.Equal("mine", File.ReadAllText(Path.Combine(occupied, "keep.txt")));
        Assert.Single(Directory.EnumerateFileSystemEntries(occupied));

        var outcome = await run.WaitAsync();
        Assert.True(outcome.ExitCode == ((CountingGuest.SumOk << 1) | 1), $"{outcome}: {run.Serial}");
    }

    [KvmFact]
    public async Task Ctl_snapshot_of_a_paused_guest_keeps_it_paused_and_the_restored_copy_runs_the_same_course()
    {
        // `ctl pause`, `ctl snapshot` (over remoting, as from another process) without --stop, `ctl
        // resume`: the original goes on to its end; the copy, restored from the snapshot in another
        // process, prints the same numbers from the snapshot on.
        var spec = new VmSpec("counter", 32 << 20, 1, CountingGuest.Build(Limit, Tick), LapicMode.Emulated);
        var snapshot = Path.Combine(_dir, "snap");
        string atSnapshot;
        KvmRequirement.Check();
        var host = HostRunner.CreateSystem(VmConfig.Load(null), ControlClient.HostSystemName, control: true);
        await using var client = ControlClient.Create(TimeSpan.FromMinutes(3)); // remoting is slow to start under emulation
        try
        {
            using var console = SerialConsole.Captured();
            await using var vm = new VmBuilder(host, spec).WithStandardDevices(console).Start();
            host.ActorSelection($"/user/{ControlProtocol.DirectoryName}").Tell(new ControlProtocol.Register("counter", vm.Actor, ActorRefs.Nobody));
            var deadline = DateTime.UtcNow.AddMinutes(2);
            while (console.BytesWritten < Encoding(SnapshotAfter).Length && DateTime.UtcNow < deadline) await Task.Delay(5);
            // Paused first (here, at once: remoting may be slow), so the output at the snapshot is
            // known exactly; a paused VM stays paused.
            vm.Actor.Tell(VmProtocol.Pause.Instance);
            Assert.Equal(VmProtocol.Phase.Paused, (await vm.Actor.Ask<VmProtocol.Status>(VmProtocol.GetStatus.Instance, TimeSpan.FromMinutes(1))).Phase);
            var found = await client.FindVmAsync("counter", [HostRunner.ControlAddress(host)]);
            var said = await client.SnapshotAsync(found, snapshot, stop: false);
            Assert.Contains($"snapshot in {snapshot}", said);
            Assert.Equal(VmProtocol.Phase.Paused, (await client.StatusAsync(found)).Phase);
            atSnapshot = console.CapturedText();
            Assert.Equal(VmProtocol.Phase.Running, (await client.ResumeAsync(found)).Phase);
            var outcome = await vm.WaitAsync(GuestRun.DefaultTimeout);
            console.Flush();
            Assert.True(outcome.ExitCode == ((CountingGuest.SumOk << 1) | 1), $"{outcome}: {console.CapturedText()}");
            Assert.StartsWith(atSnapshot, console.CapturedText());
        }
        finally
        {
            await host.Terminate();
        }
        var serial = Path.Combine(_dir, "serial.txt");
        var (code, _, err) = await ActorVmmProcess.RunAsync(TimeSpan.FromMinutes(5), "run", "--restore", snapshot, "--serial", serial, "--timeout", "240");
        Assert.True(code == ((CountingGuest.SumOk << 1) | 1), $"exit code {code}: {err}");
        var numbers = (atSnapshot + File.ReadAllText(serial)).Split('\n', StringSplitOptions.RemoveEmptyEntries).SkipLast(1).Select(int.Parse);
        Assert.Equal(Enumerable.Range(1, Limit), numbers);
    }

    private static string Encoding(int upTo) => string.Concat(Enumerable.Range(1, upTo).Select(i => $"{i}\n"));
}

/// <summary>`actorvmm` as a separate process (the test output's actorvmm.dll).</summary>
internal static class ActorVmmProcess
{
    public static async Task<(int Code, string Out, string Err)> RunAsync(TimeSpan timeout, params string[] args)
    {
        var start = new ProcessStartInfo(Environment.GetEnvironmentVariable("DOTNET_HOST_PATH") ?? "dotnet")
        {
            RedirectStandardInput = true,
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            UseShellExecute = false,
        };
        start.ArgumentList.Add(Path.Combine(AppContext.BaseDirectory, "actorvmm.dll"));
        foreach (var a in args) start.ArgumentList.Add(a);
        using var p = Process.Start(start)!;
        p.StandardInput.Close();
        var stdout = p.StandardOutput.ReadToEndAsync();
        var stderr = p.StandardError.ReadToEndAsync();
        using var cts = new CancellationTokenSource(timeout);
        try { await p.WaitForExitAsync(cts.Token); }
        catch (OperationCanceledException)
        {
            p.Kill(entireProcessTree: true);
            Assert.Fail($"actorvmm did not exit within {timeout.TotalSeconds} s: {await stderr}");
        }
        return (p.ExitCode, await stdout, await stderr);
    }
}
