using System.Text.Json;
using Akka.Actor;
using Akka.Configuration;
using Akka.TestKit.Xunit2;
using ActorVmm.Devices;
using ActorVmm.Devices.Tracing;
using ActorVmm.Host.Tracing;
using ActorVmm.Host.Vm;
using ActorVmm.LibVmm;
using ActorVmm.Memory;
using ActorVmm.Vcpu;
using ActorVmm.Vcpu.Tests;
using Xunit;
using Xunit.Abstractions;

namespace ActorVmm.Host.Tests;

/// <summary>Causal traces of a VM (real VM actor, devices and vcpu actors; a scripted vcpu in
/// place of KVM) and their Perfetto export.</summary>
public sealed class CausalTraceTests : ScriptedVmTestKit
{

    public CausalTraceTests(ITestOutputHelper output) : base(output)
    {
    }


    /// <summary>Runs a traced VM whose vcpu writes 'h' to COM1, then 5 to debug-exit.</summary>
    private async Task<IReadOnlyList<TraceEvent>> TracedRun(TraceRecorder recorder)
    {
        var rig = Vms.Start(trace: recorder);
        rig.Vcpus[0].Supply(new VmExit.Io(true, 0x3F8, 1, 1, 'h', null), new VmExit.Io(true, Platform.DebugExitPort, 1, 1, 5, null));
        Assert.Equal(11, (await rig.Ended.WaitAsync(TimeSpan.FromSeconds(10))).ExitCode);
        await Task.Delay(200); // the last Stopped reply is recorded on enqueue; give it a moment
        return recorder.Snapshot();
    }

    [Fact]
    public async Task A_guest_exit_is_the_causal_parent_of_the_device_access_and_of_how_the_vm_ends()
    {
        var events = await TracedRun(new TraceRecorder());
        var byId = events.ToDictionary(e => e.Id);
        TraceEvent Parent(TraceEvent e) => byId[e.ParentId];

        var exitUart = events.Single(e => e.Message is VcpuProtocol.GuestExit { Address: 0x3F8 });
        var write = events.Single(e => e.Message is DeviceProtocol.Write { Value: 'h' });
        Assert.Equal(("vcpu-0", "uart0"), (write.Sender, write.Receiver));
        Assert.Equal(exitUart.Id, write.ParentId);

        // exit → WriteAndWait(debug-exit) → GuestExitRequested → Stop → Stopped
        var stopped = events.Single(e => e.Message is VcpuProtocol.Stopped && e.Receiver.StartsWith("vm-", StringComparison.Ordinal));
        var stop = Parent(stopped);
        Assert.IsType<VcpuProtocol.Stop>(stop.Message);
        var requested = Parent(stop);
        Assert.IsType<DeviceProtocol.GuestExitRequested>(requested.Message);
        var exitWrite = Parent(requested);
        Assert.Equal(("vcpu-0", "debug-exit"), (exitWrite.Sender, exitWrite.Receiver));
        Assert.IsType<DeviceProtocol.WriteAndWait>(exitWrite.Message);
        var exit = Parent(exitWrite);
        Assert.Equal(new VcpuProtocol.GuestExit(0, "io-out", Platform.DebugExitPort, 1, true, 5), exit.Message);
        Assert.True(exit.Nanoseconds <= exitWrite.Nanoseconds && exitWrite.Nanoseconds <= requested.Nanoseconds);

        // Messages from outside the actors have no parent.
        Assert.Equal(0, events.Single(e => e.Message is VmProtocol.Start).ParentId);
    }

    [Fact]
    public async Task The_perfetto_export_is_valid_json_with_a_track_per_actor_and_flow_arrows()
    {
        var events = await TracedRun(new TraceRecorder());
        using var stream = new MemoryStream();
        PerfettoExport.Write(events, stream, "test vm");
        using var doc = JsonDocument.Parse(stream.ToArray());
        var all = doc.RootElement.GetProperty("traceEvents").EnumerateArray().ToList();

        var tracks = all.Where(e => e.GetProperty("ph").GetString() == "M" && e.GetProperty("name").GetString() == "thread_name")
            .Select(e => e.GetProperty("args").GetProperty("name").GetString()).ToHashSet();
        Assert.Contains("vcpu-0", tracks);
        Assert.Contains("uart0", tracks);
        Assert.Contains("debug-exit", tracks);
        Assert.Contains(tracks, t => t!.StartsWith("vm-", StringComparison.Ordinal));

        var slices = all.Where(e => e.GetProperty("ph").GetString() == "X").ToList();
        Assert.Equal(events.Count, slices.Count);
        Assert.Contains(slices, s => s.GetProperty("name").GetString() == "GuestExit");

        var starts = all.Where(e => e.GetProperty("ph").GetString() == "s").Select(e => e.GetProperty("id").GetInt64()).ToList();
        var finishes = all.Where(e => e.GetProperty("ph").GetString() == "f").Select(e => e.GetProperty("id").GetInt64()).ToList();
        Assert.NotEmpty(starts);
        Assert.Equal(starts.Order(), finishes.Order());
        Assert.Equal(events.Count(e => e.ParentId != 0 && events.Any(p => p.Id == e.ParentId)), starts.Count);
    }

    [Fact]
    public async Task A_filter_keeps_the_named_actors_and_types_only()
    {
        var events = await TracedRun(new TraceRecorder(filter: TraceFilter.Parse("actor=uart0,type=Write")));
        Assert.NotEmpty(events);
        Assert.All(events, e => Assert.True(e.Type == "Write" && (e.Sender == "uart0" || e.Receiver == "uart0"), e.ToString()));
    }

    [Fact]
    public void Sampling_keeps_one_event_in_n_and_bad_filters_are_refused()
    {
        var recorder = new TraceRecorder(filter: TraceFilter.Parse("sample=3"));
        for (var i = 0; i < 30; i++) recorder.Record(TestActor, TestActor, new DeviceProtocol.WriteCredit(i));
        Assert.Equal(10, recorder.Snapshot().Count);
        Assert.Throws<FormatException>(() => TraceFilter.Parse("colour=red"));
        Assert.Throws<FormatException>(() => TraceFilter.Parse("sample=0"));
        Assert.Throws<FormatException>(() => TraceFilter.Parse("actor"));
    }
}
