using System.Collections.Concurrent;
using System.Text;
using Akka.Actor;
using Akka.Cluster;
using Akka.TestKit;
using Akka.TestKit.Xunit2;
using ActorVmm.Devices;
using ActorVmm.Devices.Tracing;
using ActorVmm.Host.Cluster;
using ActorVmm.Host.Tracing;
using ActorVmm.Host.Config;
using ActorVmm.Host.Control;
using ActorVmm.Host.Vm;
using Xunit;

namespace ActorVmm.Host.Tests;

/// <summary>
/// A device actor on another host node than its VM (<see cref="RemoteDevices"/>), between two host nodes
/// of one cluster in this process: the VM's side is a proxy with probes for the vcpu, the IOAPIC, the
/// 8259 and the VM; the device (COM1's UART) runs on the other node. Then that node is downed, as the
/// split-brain resolver downs a dead node, and the device goes on beside the VM from its last state.
/// (A guest on two `actorvmm host` processes, one of them killed, is in the Integration tests.)
/// </summary>
public sealed class RemoteDeviceTests : IAsyncLifetime
{
    private readonly InProcessCluster _cluster = new();

    public Task InitializeAsync() => Task.CompletedTask;

    public async Task DisposeAsync() => await _cluster.DisposeAsync();

    private Task<(ActorSystem First, ActorSystem Second)> TwoNodes() => _cluster.TwoNodes();

    /// <summary>The VM's side of a remote COM1: probes in its place, the output collected.</summary>
    private sealed class VmSide(ActorSystem system)
    {
        public readonly TestProbe Vcpu = new(system, new XunitAssertions());
        public readonly TestProbe IoApic = new(system, new XunitAssertions());
        public readonly TestProbe Pic = new(system, new XunitAssertions());
        public readonly TestProbe Vm = new(system, new XunitAssertions());
        public readonly ConcurrentQueue<byte> Output = new();

        public string Printed => Encoding.ASCII.GetString(Output.ToArray());

        public IActorRef Proxy(Address node, TimeSpan? placementTimeout = null, bool traced = false, TimeSpan? silenceLimit = null)
        {
            var interrupts = new VmInterrupts { IoApic = IoApic, Pic = Pic };
            var clock = new MonotonicClock();
            var vm = Vm.Ref;
            void Out(byte b) => Output.Enqueue(b);
            IBusDevice Model(IPlatformEvents events, object? state) =>
                PcPlatform.HostableModel(PcPlatform.Com1Kind, new DeviceContext(events, interrupts, clock), Out, state);
            var setup = new RemoteDevices.Setup("vm1", "uart0", PcPlatform.Com1Kind, node, IoApic, Pic, vm, Out,
                state => DeviceProtocol.Props("uart0", events => Model(events, null), Model, vm, initialState: state)
                    .WithDispatcher(DeviceProtocol.DispatcherId),
                null, placementTimeout ?? TimeSpan.FromSeconds(30), silenceLimit);
            var props = RemoteDevices.ProxyProps(setup);
            return system.ActorOf(traced ? props.WithMailbox(TracedMailboxType.Id) : props, "uart0");
        }

        public async Task<ulong> Read(IActorRef uart, long id, ulong offset)
        {
            uart.Tell(new DeviceProtocol.Read(id, offset, 1), Vcpu);
            var result = await Vcpu.ExpectMsgAsync<DeviceProtocol.ReadResult>(TimeSpan.FromSeconds(30));
            Assert.Equal(id, result.Id);
            return result.Value;
        }

        public void Write(IActorRef uart, ulong offset, byte value) => uart.Tell(new DeviceProtocol.Write(offset, 1, value), Vcpu);

        public async Task<string> Location(IActorRef uart)
        {
            uart.Tell(DeviceProtocol.GetStats.Instance, Vcpu);
            return (await Vcpu.ExpectMsgAsync<DeviceProtocol.Stats>(TimeSpan.FromSeconds(30))).Location ?? "";
        }
    }

    /// <summary>A probe on <paramref name="node"/> watching the uart0 that node hosts.</summary>
    private static async Task<(TestProbe Watcher, IActorRef Hosted)> WatchHosted(ActorSystem node)
    {
        var watcher = new TestProbe(node, new XunitAssertions());
        node.ActorSelection($"/user/{ControlProtocol.DirectoryName}/{RemoteDevices.HostedPrefix}*/uart0").Tell(new Identify(1), watcher);
        var hosted = (await watcher.ExpectMsgAsync<ActorIdentity>(TimeSpan.FromSeconds(30))).Subject;
        Assert.NotNull(hosted);
        watcher.Watch(hosted);
        return (watcher, hosted);
    }

    private const ulong Thr = 0, Ier = 1, Lcr = 3, Mcr = 4, Scr = 7;

    [Fact]
    public async Task A_uart_on_another_node_serves_the_vm_and_moves_to_the_vms_node_with_its_state_when_that_node_is_downed()
    {
        var (vmNode, otherNode) = await TwoNodes();
        var otherAddress = Akka.Cluster.Cluster.Get(otherNode).SelfAddress;
        var side = new VmSide(vmNode);
        var uart = side.Proxy(otherAddress);

        // Registers written and read back across the network, with the vcpu's own read ids.
        side.Write(uart, Lcr, 0x03);
        side.Write(uart, Scr, 0x5A);
        Assert.Equal(0x5AUL, await side.Read(uart, 41, Scr));
        Assert.Equal(0x03UL, await side.Read(uart, 42, Lcr));
        // The transmitted bytes come back to the VM's node.
        foreach (var c in "hello from the other node\n") side.Write(uart, Thr, (byte)c);
        Assert.Equal(0x5AUL, await side.Read(uart, 43, Scr)); // answered behind the bytes (FIFO)
        await AwaitAssert(() => Assert.Equal("hello from the other node\n", side.Printed));
        // Its interrupt line drives the VM's IOAPIC and 8259 from the other node.
        side.Write(uart, Mcr, 0x08); // OUT2: the PC's gate of the UART's interrupt line
        side.Write(uart, Ier, 0x02); // THR empty interrupt on
        var level = await side.IoApic.ExpectMsgAsync<DeviceProtocol.SetIrqLevel>(TimeSpan.FromSeconds(30));
        Assert.Equal(new DeviceProtocol.SetIrqLevel((int)Platform.Com1Gsi, true), level);
        Assert.Equal(otherAddress, side.IoApic.LastSender.Path.Address);
        Assert.Equal(new DeviceProtocol.SetIrqLevel((int)Platform.Com1Gsi, true), await side.Pic.ExpectMsgAsync<DeviceProtocol.SetIrqLevel>());
        Assert.Contains($"on {NodeProtocol.NodeName(otherAddress)}", await side.Location(uart));
        // Its state record (a snapshot's part) is the one its node mirrored, after everything sent before.
        uart.Tell(new DeviceProtocol.GetState(48), side.Vm);
        var state = await side.Vm.ExpectMsgAsync<DeviceProtocol.StateReply>(TimeSpan.FromSeconds(30));
        Assert.Equal(48, state.Id);
        Assert.Equal(new { Lcr = (byte)0x03, Mcr = (byte)0x08, Ier = (byte)0x02, Scr = (byte)0x5A },
            state.State is UartState u ? new { u.Lcr, u.Mcr, u.Ier, u.Scr } : null);

        // A read in flight when the node goes: the device there is stalled, so it is never answered.
        uart.Tell(new FaultProtocol.Stall(TimeSpan.FromSeconds(60), "hold the read"), side.Vcpu);
        side.Write(uart, Scr, 0x77); // lost with its node: its effect never came back
        uart.Tell(new DeviceProtocol.Read(44, Scr, 1), side.Vcpu);
        await Task.Delay(500);
        Akka.Cluster.Cluster.Get(vmNode).Down(otherAddress);

        // The read in flight reads all-ones; the device goes on here from the state it mirrored last.
        var inFlight = await side.Vcpu.ExpectMsgAsync<DeviceProtocol.ReadResult>(TimeSpan.FromSeconds(60));
        Assert.Equal(new DeviceProtocol.ReadResult(44, 0xFF), inFlight);
        var moved = await side.Vm.FishForMessageAsync<VmProtocol.ChildRestarted>(m => m is VmProtocol.ChildRestarted, TimeSpan.FromSeconds(30));
        Assert.Equal("uart0", moved.Child);
        Assert.Contains($"its node {NodeProtocol.NodeName(otherAddress)} was lost", moved.Cause);
        Assert.True(moved.Cause.Contains("; 1 write(s) in flight lost"), moved.Cause);
        Assert.Equal(0x5AUL, await side.Read(uart, 45, Scr));
        Assert.Equal(0x03UL, await side.Read(uart, 46, Lcr));
        Assert.Equal(0x02UL, await side.Read(uart, 47, Ier));
        Assert.Contains("on this node", await side.Location(uart));
        foreach (var c in "still here\n") side.Write(uart, Thr, (byte)c);
        await AwaitAssert(() => Assert.Equal("hello from the other node\nstill here\n", side.Printed));
    }

    [Fact]
    public async Task A_uart_on_another_node_that_answers_nothing_while_a_read_waits_is_taken_as_lost_and_stopped_there()
    {
        var (vmNode, otherNode) = await TwoNodes();
        var otherAddress = Akka.Cluster.Cluster.Get(otherNode).SelfAddress;
        var side = new VmSide(vmNode);
        var uart = side.Proxy(otherAddress, silenceLimit: TimeSpan.FromSeconds(2));
        side.Write(uart, Scr, 0x5A);
        Assert.Equal(0x5AUL, await side.Read(uart, 1, Scr)); // placed and serving

        var (watcher, hosted) = await WatchHosted(otherNode);

        // Both nodes stay up, but the device says nothing (stalled far longer than the limit), as when a
        // request was lost with a broken connection.
        uart.Tell(new FaultProtocol.Stall(TimeSpan.FromSeconds(20), "silent"), side.Vm);
        side.Write(uart, Scr, 0x77); // never confirmed: lost with the device
        uart.Tell(new DeviceProtocol.Read(2, Scr, 1), side.Vcpu);
        var read = await side.Vcpu.FishForMessageAsync<DeviceProtocol.ReadResult>(m => m is DeviceProtocol.ReadResult, TimeSpan.FromSeconds(30));
        Assert.Equal(new DeviceProtocol.ReadResult(2, 0xFF), read);
        var moved = await side.Vm.FishForMessageAsync<VmProtocol.ChildRestarted>(m => m is VmProtocol.ChildRestarted, TimeSpan.FromSeconds(30));
        Assert.Contains($"it answered nothing for 2 s while requests waited on {NodeProtocol.NodeName(otherAddress)}", moved.Cause);
        Assert.Contains("1 write(s) in flight lost", moved.Cause);
        // The device there is told to stop; the one here goes on from the state mirrored last.
        await watcher.ExpectTerminatedAsync(hosted, TimeSpan.FromSeconds(30));
        Assert.Equal(0x5AUL, await side.Read(uart, 3, Scr));
        Assert.Contains("on this node", await side.Location(uart));
        side.Vcpu.ExpectNoMsg(TimeSpan.FromMilliseconds(500)); // nothing more for read 2
    }

    [Fact]
    public async Task A_hosted_device_stops_when_its_vms_node_is_gone()
    {
        var (vmNode, otherNode) = await TwoNodes();
        var side = new VmSide(vmNode);
        var uart = side.Proxy(Akka.Cluster.Cluster.Get(otherNode).SelfAddress);
        side.Write(uart, Scr, 0x33);
        Assert.Equal(0x33UL, await side.Read(uart, 1, Scr)); // placed and serving

        var (watcher, hosted) = await WatchHosted(otherNode);
        Akka.Cluster.Cluster.Get(otherNode).Down(Akka.Cluster.Cluster.Get(vmNode).SelfAddress);
        await watcher.ExpectTerminatedAsync(hosted, TimeSpan.FromSeconds(60));
    }

    [Fact]
    public async Task A_device_whose_node_does_not_answer_runs_beside_its_vm()
    {
        var (vmNode, _) = await TwoNodes();
        var side = new VmSide(vmNode);
        var nowhere = new Address("akka.ssl.tcp", ControlClient.HostSystemName, "127.0.0.1", 1);
        var uart = side.Proxy(nowhere, TimeSpan.FromSeconds(2));
        side.Write(uart, Scr, 0x11);
        Assert.Equal(0x11UL, await side.Read(uart, 1, Scr)); // waited for the placement, then served here
        var moved = await side.Vm.ExpectMsgAsync<VmProtocol.ChildRestarted>(TimeSpan.FromSeconds(30));
        Assert.Contains("127.0.0.1:1 did not answer within 2 s", moved.Cause);
        Assert.Contains("on this node", await side.Location(uart));
    }

    [Fact]
    public async Task A_node_refuses_to_host_a_device_it_does_not_know_or_a_state_that_is_not_valid()
    {
        var (vmNode, otherNode) = await TwoNodes();
        var probe = new TestProbe(vmNode, new XunitAssertions());
        var other = vmNode.ActorSelection(new RootActorPath(Akka.Cluster.Cluster.Get(otherNode).SelfAddress) / "user" / ControlProtocol.DirectoryName);
        RemoteDevices.HostDevice Ask(string kind, byte[]? state) =>
            new("vm1", "uart0", kind, state, probe.Ref, probe.Ref, probe.Ref, probe.Ref);

        other.Tell(Ask("floppy", null), probe);
        Assert.Contains("cannot run a device of kind \"floppy\"", (await probe.ExpectMsgAsync<RemoteDevices.DeviceHostRefused>(TimeSpan.FromSeconds(30))).Why);
        other.Tell(Ask(PcPlatform.Com1Kind, "{\"type\": \"uart16550\"}"u8.ToArray()), probe);
        Assert.Contains("state record is not valid", (await probe.ExpectMsgAsync<RemoteDevices.DeviceHostRefused>(TimeSpan.FromSeconds(30))).Why);
        var pitState = DeviceStateCodec.Encode(new ResetControlState(0));
        other.Tell(Ask(PcPlatform.Com1Kind, pitState), probe);
        Assert.Contains("not one of a com1", (await probe.ExpectMsgAsync<RemoteDevices.DeviceHostRefused>(TimeSpan.FromSeconds(30))).Why);
    }

    [Fact]
    public async Task A_traced_vms_trace_follows_a_read_to_the_device_on_the_other_node_and_back()
    {
        var (vmNode, otherNode) = await TwoNodes();
        var otherAddress = Akka.Cluster.Cluster.Get(otherNode).SelfAddress;
        await using var recorder = new TraceRecorder(null);
        using var registration = MessageTraceRegistry.Register(vmNode, "/user/uart0", recorder);
        var side = new VmSide(vmNode);
        var uart = side.Proxy(otherAddress, traced: true);
        side.Write(uart, Scr, 0x42);
        Assert.Equal(0x42UL, await side.Read(uart, 6, Scr)); // placed (what waited for it lost its parents in the stash)
        Assert.Equal(0x42UL, await side.Read(uart, 7, Scr));

        // One causal chain: the vcpu's read at the proxy, the read at the device on the other node, its
        // answer back at the proxy; the other node's actor is named with its node.
        var there = $"uart0@{NodeProtocol.NodeName(otherAddress)}";
        TraceEvent read = null!, atDevice = null!, answer = null!;
        await AwaitAssert(() =>
        {
            var events = recorder.Snapshot();
            read = Assert.Single(events, e => e is { Receiver: "uart0", Message: DeviceProtocol.Read { Id: 7 } });
            atDevice = Assert.Single(events, e => e.Receiver == there && e.Message is DeviceProtocol.Read && e.ParentId == read.Id);
            Assert.Equal("uart0", atDevice.Sender);
            answer = Assert.Single(events, e => e.Receiver == "uart0" && e.Message is DeviceProtocol.ReadResult && e.ParentId == atDevice.Id);
        });
        Assert.Equal(there, answer.Sender);

        // Perfetto: the other node's actors in a process of their own.
        using var perfetto = new MemoryStream();
        PerfettoExport.Write(recorder.Snapshot(), perfetto, "vm1");
        var json = Encoding.UTF8.GetString(perfetto.ToArray());
        Assert.Contains($"\"vm1: node {NodeProtocol.NodeName(otherAddress)}\"", json);
        Assert.Contains("\"vm1\"", json);
    }

    [Fact]
    public async Task The_device_node_option_names_the_node_and_run_alone_refuses_it()
    {
        var options = new Cli.VmOptions();
        var command = new System.CommandLine.Command("run");
        options.AddTo(command);
        List<KeyValuePair<string, string>> Settings(params string[] args) => options.Settings(command.Parse(args), absolute: false);
        Assert.Equal([new("actorvmm.vm.devices.uart0.node", "127.0.0.1:4712")], Settings("--device-node", "uart0=127.0.0.1:4712"));
        Assert.Contains("give NAME=HOST:PORT", Assert.Throws<ConfigException>(() => Settings("--device-node", "uart0")).Message);

        // `actorvmm run` is in no cluster: it says so before building anything.
        var config = ConfigValues.From(Settings("--device-node", "uart0=127.0.0.1:4712")).WithFallback(VmConfig.Load(null));
        var stderr = new StringWriter();
        var code = await HostRunner.RunAsync(Task.FromException<ActorSystem>(new InvalidOperationException("not started")), config,
            VmConfig.From(config), null!, new HostRunner.RunOptions(), stderr);
        Assert.Equal(VmProtocol.Outcome.HostErrorCode, code);
        Assert.Contains("devices on other nodes (uart0) need a cluster", stderr.ToString());
    }

    private static async Task AwaitAssert(Action assertion)
    {
        var deadline = DateTime.UtcNow + TimeSpan.FromSeconds(30);
        while (true)
        {
            try
            {
                assertion();
                return;
            }
            catch (Xunit.Sdk.XunitException) when (DateTime.UtcNow < deadline)
            {
                await Task.Delay(50);
            }
        }
    }
}
