using Akka.Actor;
using ActorVmm.Devices;
using ActorVmm.Devices.Tracing;
using ActorVmm.Host.Config;
using ActorVmm.Host.Control;
using ActorVmm.Host.Tracing;
using ActorVmm.Host.Vm;
using ActorVmm.LibVmm;
using ActorVmm.Memory;
using ActorVmm.Vcpu.Tests;
using Xunit;

namespace ActorVmm.Host.Tests;

/// <summary>`ctl trace`: a traced VM (real VM, device and vcpu actors; scripted vcpu) on a host
/// actor system, followed from a ctl actor system over remoting on 127.0.0.1.</summary>
public sealed class TraceFollowTests : IAsyncLifetime
{
    private ActorSystem _host = null!;
    private GuestMemoryMap _memory = null!;
    private ScriptedVcpu _vcpu = null!;
    private ControlClient _client = null!;
    private IDisposable _registration = null!;
    private IActorRef _vm = null!;
    private string _address = "";

    public async Task InitializeAsync()
    {
        _host = HostRunner.CreateSystem(VmConfig.Load(null), ControlClient.HostSystemName, control: true);
        _address = HostRunner.ControlAddress(_host);
        _memory = VmspaceLayout.Build(4 << 20);
        _vcpu = new ScriptedVcpu(0);
        var recorder = new TraceRecorder();
        _registration = MessageTraceRegistry.Register(_host, "/user/vm-traced", recorder);
        var devices = new List<DeviceSpec>
        {
            new("uart0", DeviceProtocol.Space.Port, Platform.Com1Port, Platform.Com1Length, _ => new Uart16550(NullInterruptLine.Instance, _ => { })),
        };
        var ended = new TaskCompletionSource<VmProtocol.Outcome>(TaskCreationOptions.RunContinuationsAsynchronously);
        var resources = new VmResources("traced", _memory, [_vcpu], devices, Traced: true);
        _vm = _host.ActorOf(Props.Create(() => new VmActor(resources, ended)).WithMailbox(TracedMailboxType.Id), "vm-traced");
        var hub = _host.ActorOf(TraceProtocol.Props("traced", recorder), "trace-vm-traced");
        _host.ActorSelection("/user/vmm").Tell(new ControlProtocol.Register("traced", _vm, hub));
        _host.ActorSelection("/user/vmm").Tell(new ControlProtocol.Register("untraced", _host.ActorOf(Props.Empty, "plain"), ActorRefs.Nobody));
        _vm.Tell(VmProtocol.Start.Instance);
        Assert.True(_vcpu.WaitUntilIdleInGuest());
        _client = ControlClient.Create(TimeSpan.FromSeconds(5));
        await Task.CompletedTask;
    }

    public async Task DisposeAsync()
    {
        await _client.DisposeAsync();
        _vm.Tell(new VmProtocol.Stop("test over"));
        _vcpu.Dispose();
        await _host.Terminate();
        _registration.Dispose();
        _memory.Dispose();
    }

    [Fact]
    public async Task Ctl_trace_follow_streams_the_messages_as_they_happen()
    {
        var entry = await _client.FindEntryAsync("traced", [_address]);
        var lines = new List<TraceProtocol.TraceLine>();
        using var timeout = new CancellationTokenSource(TimeSpan.FromSeconds(20));
        var subscribed = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        var following = _client.FollowTraceAsync(entry, "type=Write", 3, lines.Add, timeout.Token, subscribed.SetResult);
        await subscribed.Task.WaitAsync(timeout.Token); // the hub streams to us before the guest writes
        _vcpu.Supply(new VmExit.Io(true, 0x3F8, 1, 1, 'a', null), new VmExit.Io(true, 0x3F8, 1, 1, 'b', null),
            new VmExit.Io(true, 0x3F8, 1, 1, 'c', null));

        Assert.Equal(3, await following);
        Assert.All(lines, l => Assert.Equal(("vcpu-0", "uart0", "Write"), (l.Sender, l.Receiver, l.Type)));
        Assert.Equal(["Write { Offset = 0, Size = 1, Value = 97 }", "Write { Offset = 0, Size = 1, Value = 98 }",
            "Write { Offset = 0, Size = 1, Value = 99 }"], lines.Select(l => l.Text));
        Assert.All(lines, l => Assert.NotEqual(0, l.Parent)); // caused by the exit
    }

    [Fact]
    public async Task Ctl_trace_shows_recent_messages_and_refuses_an_untraced_vm()
    {
        _vcpu.Supply(new VmExit.Io(true, 0x3F8, 1, 1, 'z', null));
        Assert.True(_vcpu.WaitUntilIdleInGuest());
        var recent = await _client.RecentTraceAsync(await _client.FindEntryAsync("traced", [_address]), 50, "actor=vcpu-0");
        Assert.Contains(recent, l => l.Type == "GuestExit");
        Assert.Contains(recent, l => l.Type == "Write" && l.Text.Contains("Value = 122"));

        var untraced = await _client.FindEntryAsync("untraced", [_address]);
        var e = await Assert.ThrowsAsync<ControlException>(() => _client.RecentTraceAsync(untraced, 10, ""));
        Assert.Contains("not traced", e.Message);
        var traced = await _client.FindEntryAsync("traced", [_address]);
        var bad = await Assert.ThrowsAsync<ControlException>(() => _client.RecentTraceAsync(traced, 10, "colour=red"));
        Assert.Contains("colour", bad.Message);
    }
}
