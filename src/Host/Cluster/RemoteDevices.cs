using Akka.Actor;
using Akka.Event;
using ActorVmm.Devices;
using ActorVmm.Devices.Tracing;
using ActorVmm.Host.Vm;

namespace ActorVmm.Host.Cluster;

/// <summary>
/// Device actors that run on another host node than their VM (<c>actorvmm.vm.devices.NAME.node</c>).
/// The VM keeps a proxy in the device's place (<see cref="RemoteDeviceProxy"/>), which has the other
/// node's node actor build the device there (<see cref="HostDevice"/> → <see cref="HostedDevice"/>) and
/// passes the device protocol through: posted writes, reads and waited writes with their ids, barriers,
/// state requests; the device's interrupt lines tell the VM's IOAPIC and 8259 directly, its write
/// node sends the proxy, after every posted write and every other message that changed something, what
/// changed (<see cref="DeviceEffects"/>: the writes handled, output bytes and the model's state record,
/// encoded by <see cref="DeviceStateCodec"/>). When the device's node is lost (the cluster removed it) the proxy
/// answers every read in flight with all-ones and every waited write as done, returns the write
/// credits of the writes in flight, and builds the device on the VM's node from the last state
/// record it received: the guest goes on. What it can lose is exactly what was in flight: the writes
/// whose effects (state, output) had not come back when the node was lost.
/// </summary>
public static class RemoteDevices
{
    public interface IRemoteDeviceMessage;

    /// <summary>
    /// To a host node's node actor (/user/vmm): build device <paramref name="Device"/> of VM
    /// <paramref name="Vm"/> here, as model <paramref name="Kind"/> (<see cref="PcPlatform.HostableModel"/>)
    /// from <paramref name="State"/> (a <see cref="DeviceStateCodec"/> record; null: power-on), its
    /// interrupt lines to <paramref name="IoApic"/> and <paramref name="Pic"/>, its guest requests (exit,
    /// reset) to <paramref name="Events"/> (the VM), everything else to <paramref name="Proxy"/>. Answered
    /// <see cref="DeviceHosted"/> or <see cref="DeviceHostRefused"/>.
    /// </summary>
    /// <remarks>With <paramref name="Traced"/> (the VM records its message trace) the device's messages go
    /// into that trace: every message the device receives is sent to the proxy as a <see cref="TraceRecord"/>,
    /// and its messages to the VM's actors carry their causal parent (<see cref="CarriedMessage"/>).</remarks>
    public sealed record HostDevice(string Vm, string Device, string Kind, byte[]? State, IActorRef IoApic, IActorRef Pic,
        IActorRef Events, IActorRef Proxy, bool Traced = false) : IRemoteDeviceMessage;

    /// <summary>From a traced hosted device's node to its proxy: a message the device received, with its
    /// trace id and causal parent (ids are unique among the cluster's processes: <see cref="TraceContext"/>),
    /// for the VM's trace. Not itself traced.</summary>
    public sealed record TraceRecord(long Id, long Parent, IActorRef? Sender, IActorRef Receiver, object Message)
        : IRemoteDeviceMessage, INotTraced;

    /// <summary>The prefix of the name of the actor a node hosts a device under (/user/vmm/device-...).</summary>
    public const string HostedPrefix = "device-";

    /// <param name="Actor">the device actor, which the proxy talks to from now on</param>
    /// <param name="Device">the device's name</param>
    public sealed record DeviceHosted(string Device, IActorRef Actor) : IRemoteDeviceMessage;

    public sealed record DeviceHostRefused(string Device, string Why) : IRemoteDeviceMessage;

    /// <summary>
    /// From a hosted device to its proxy, after each posted write it handled and after any other message
    /// that changed something: <paramref name="WritesHandled"/> the posted writes it has handled so far
    /// (the proxy's confirmation that their effects are here), <paramref name="Output"/> the bytes its
    /// model produced meanwhile (a UART's transmitted bytes, for the VM's console), <paramref name="State"/>
    /// its new state record (null: unchanged). <paramref name="Sequence"/> counts these messages from 1.
    /// </summary>
    public sealed record DeviceEffects(long Sequence, long WritesHandled, byte[] Output, byte[]? State) : IRemoteDeviceMessage;

    /// <summary>From the host of a device to its proxy: the device failed and restarts there from its
    /// state record (as a device beside its VM restarts).</summary>
    public sealed record HostedDeviceFailed(string Device, string Cause) : IRemoteDeviceMessage;

    /// <summary>What a VM needs to run device <paramref name="Device"/> on node <paramref name="Node"/>.</summary>
    /// <param name="Kind">its model's kind on the other node (<see cref="PcPlatform.HostableModel"/>)</param>
    /// <param name="Vm">the VM's name (logs, the other node's actor names)</param>
    /// <param name="IoApic">the VM's IOAPIC actor (the device's interrupt lines)</param>
    /// <param name="Pic">the VM's 8259 actor</param>
    /// <param name="Events">the VM actor: the guest's requests (exit, reset) and the proxy's reports</param>
    /// <param name="Output">where the device's output goes on the VM's node (the console, for a UART)</param>
    /// <param name="LocalProps">the props of the device built on the VM's node from a state record (null: power-on)</param>
    /// <param name="InitialState">the state the device starts from (a restored VM's); null: power-on</param>
    /// <param name="PlacementTimeout">how long the other node may take to answer before the device runs here</param>
    /// <param name="SilenceLimit">how long the placed device may say nothing while requests wait for it before it
    /// is taken as lost (null: <see cref="DefaultSilenceLimit"/>)</param>
    public sealed record Setup(string Vm, string Device, string Kind, Address Node, IActorRef IoApic, IActorRef Pic, IActorRef Events,
        Action<byte> Output, Func<object?, Props> LocalProps, object? InitialState, TimeSpan PlacementTimeout, TimeSpan? SilenceLimit = null);

    /// <summary>
    /// A device on another node that answers nothing (no answer, no effects) for this long while requests
    /// wait for it is taken as lost, as if its node were: Akka remoting delivers at most once, and a
    /// message lost with a broken connection between two nodes that both stay up would otherwise leave
    /// a vcpu waiting for ever. Far above any round trip (well under a millisecond; seconds on a loaded
    /// machine).
    /// </summary>
    public static readonly TimeSpan DefaultSilenceLimit = TimeSpan.FromSeconds(60);

    /// <summary>A device actor's supervision away from its VM actor, as the VM supervises its devices
    /// (<see cref="VmActor.Supervision"/>, at most <see cref="VmActor.MaxDeviceRestarts"/> restarts a
    /// minute); <paramref name="restarting"/> hears the cause of each restart.</summary>
    internal static SupervisorStrategy DeviceSupervision(Action<string> restarting) =>
        new OneForOneStrategy(VmActor.MaxDeviceRestarts, TimeSpan.FromMinutes(1), cause =>
        {
            var directive = VmActor.Supervision.Decide(restartable: true, cause);
            if (directive == Directive.Restart) restarting($"{cause.GetType().Name}: {cause.Message}");
            return directive;
        });

    /// <summary>The proxy's props; it runs on the device dispatcher, as the device would.</summary>
    public static Props ProxyProps(Setup setup) =>
        Props.Create(() => new RemoteDeviceProxy(setup)).WithDispatcher(DeviceProtocol.DispatcherId);

    /// <summary>The node actor's part: builds the device asked for, or says why not.</summary>
    internal static void Host(IActorContext context, HostDevice request)
    {
        string? refusal = null;
        object? state = null;
        if (!ActorPath.IsValidPathElement(request.Device) || request.Device.StartsWith('$'))
            refusal = $"\"{request.Device}\" cannot name a device";
        else if (!PcPlatform.IsHostable(request.Kind))
            refusal = $"this node cannot run a device of kind \"{request.Kind}\" (it can: {string.Join(", ", PcPlatform.HostableKinds)})";
        else if (request.State is { } json)
        {
            try { state = DeviceStateCodec.Decode(json); }
            catch (SnapshotStateException e) { refusal = $"its state record is not valid: {e.Message}"; }
            if (state is not null && !PcPlatform.FitsHostable(request.Kind, state))
                refusal = $"its state record is a {state.GetType().Name}, not one of a {request.Kind}";
        }
        if (refusal is not null)
        {
            context.Sender.Tell(new DeviceHostRefused(request.Device, refusal));
            return;
        }
        context.ActorOf(Props.Create(() => new HostedDevice(request, state, context.Sender)), $"{HostedPrefix}{Guid.NewGuid():N}");
    }
}

/// <summary>
/// A device hosted for a VM on another node: the device actor (its child, restarted from its state
/// record on failure as beside its VM), a mirror that sends the VM's proxy every change, and a watch
/// on the proxy: when the VM's device (or its whole node) is gone, so is this.
/// </summary>
internal sealed class HostedDevice : ReceiveActor
{
    private readonly RemoteDevices.HostDevice _request;
    private readonly object? _initialState;
    private readonly IActorRef _replyTo;
    private IActorRef _device = ActorRefs.Nobody;

    public HostedDevice(RemoteDevices.HostDevice request, object? initialState, IActorRef replyTo)
    {
        _request = request;
        _initialState = initialState;
        _replyTo = replyTo;
        Receive<Terminated>(_ => Context.Stop(Self));
    }

    protected override void PreStart()
    {
        var request = _request;
        var system = Context.System;
        // Traced: what the device sends the VM's actors carries its causal parent, and what it receives is
        // recorded in the VM's trace (the sink is registered before the device's mailbox looks for it).
        IActorRef Out(IActorRef to) => request.Traced ? CarryingRef.Around(to, system) : to;
        if (request.Traced)
            _trace = MessageTraceRegistry.Register(system, Self.Path.ToStringWithoutAddress(), new ToProxy(request.Proxy));
        var interrupts = new VmInterrupts { IoApic = Out(request.IoApic), Pic = Out(request.Pic) };
        var events = Out(request.Events);
        var mirror = new EffectsMirror(Out(request.Proxy));
        var clock = new MonotonicClock();
        IBusDevice Build(IPlatformEvents platform, object? state) =>
            PcPlatform.HostableModel(request.Kind, new DeviceContext(platform, interrupts, clock, vm: events), mirror.Output, state);
        var props = DeviceProtocol.Props(request.Device, platform => Build(platform, null), Build, events,
            initialState: _initialState, mirror: mirror).WithDispatcher(DeviceProtocol.DispatcherId);
        _device = Context.ActorOf(request.Traced ? props.WithMailbox(TracedMailboxType.Id) : props, request.Device);
        Context.Watch(_device);
        Context.Watch(request.Proxy);
        _replyTo.Tell(new RemoteDevices.DeviceHosted(request.Device, _device));
        Context.GetLogger().Info("device {0} of VM {1} runs here for {2}", request.Device, request.Vm, request.Proxy.Path.Address);
    }

    private IDisposable? _trace;

    protected override void PostStop() => _trace?.Dispose();

    /// <summary>The VM's trace, for a traced device: each message it receives goes to the proxy (which
    /// records it); on the mailbox's thread, so it only tells.</summary>
    private sealed class ToProxy(IActorRef proxy) : ITraceSink
    {
        public void Record(long id, long parentId, IActorRef? sender, IActorRef receiver, object message) =>
            proxy.Tell(new RemoteDevices.TraceRecord(id, parentId, sender is CarryingRef c ? c.Target : sender, receiver, message), ActorRefs.NoSender);
    }

    /// <summary>A failure restarts the device from its state record, as beside its VM (at most
    /// <see cref="VmActor.MaxDeviceRestarts"/> a minute; then it stops, and its proxy takes the device
    /// back to the VM's node); the proxy hears of each.</summary>
    protected override SupervisorStrategy SupervisorStrategy()
    {
        var proxy = _request.Proxy;
        var device = _request.Device;
        return RemoteDevices.DeviceSupervision(cause => proxy.Tell(new RemoteDevices.HostedDeviceFailed(device, cause)));
    }

    /// <summary>Collects what the model outputs during a message and sends it, with the count of posted
    /// writes handled and the state record when it changed, to the proxy after the message
    /// (<see cref="IDeviceMirror"/>: the device actor's thread).</summary>
    private sealed class EffectsMirror(IActorRef proxy) : IDeviceMirror
    {
        private readonly List<byte> _output = [];
        private byte[]? _lastState;
        private long _sequence;
        private long _writes;

        public void Output(byte b) => _output.Add(b);

        public void Handled(IBusDevice model, bool postedWrite)
        {
            if (postedWrite) _writes++;
            byte[]? state = null;
            if (model is IStatefulDevice stateful)
            {
                try { state = DeviceStateCodec.Encode(stateful.SaveState()); }
                catch (Exception) { state = null; } // a model that cannot save its state has none to mirror now
            }
            var changed = state is not null && (_lastState is null || !state.AsSpan().SequenceEqual(_lastState));
            if (_output.Count == 0 && !changed && !postedWrite) return;
            if (changed) _lastState = state;
            proxy.Tell(new RemoteDevices.DeviceEffects(++_sequence, _writes, [.. _output], changed ? state : null));
            _output.Clear();
        }
    }
}
