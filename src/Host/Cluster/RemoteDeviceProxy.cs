using Akka.Actor;
using Akka.Event;
using ActorVmm.Devices;
using ActorVmm.Devices.Tracing;
using ActorVmm.Host.Vm;
using static ActorVmm.Devices.DeviceProtocol;

namespace ActorVmm.Host.Cluster;

/// <summary>
/// A device of the VM that runs on another host node, as the VM's actors see it (<see cref="RemoteDevices"/>):
/// at the device's place among the VM's children, speaking the device protocol. It passes every request
/// on as itself, with ids of its own, and answers the asker with the asker's id when the device answers;
/// it keeps the vcpus' write windows (<see cref="WriteCredits"/>) and counts a posted write as handled
/// when the device's node confirms it with its effects (<see cref="RemoteDevices.DeviceEffects"/>), or
/// the device answers anything after it (mailboxes are FIFO, and so is remoting between two actors);
/// a device on this node credits its writes back as usual. When the device actor terminates (its node
/// was removed from the cluster, or it kept failing there) the device is built on this node from the
/// last state record it mirrored, after the requests in flight were settled: reads read all-ones,
/// waited writes are done, posted writes are credited back; barriers and state requests go to the new
/// device. A device that says nothing for <see cref="RemoteDevices.Setup.SilenceLimit"/> while requests
/// wait for it, its node reachable all along, is taken as lost the same way (and told to stop); what it
/// sends afterwards is ignored.
/// </summary>
internal sealed class RemoteDeviceProxy : ReceiveActor, IWithUnboundedStash, IWithTimers
{
    private sealed record PlacementTimedOut : INotTraced { public static readonly PlacementTimedOut Instance = new(); }

    private sealed record SilenceCheck : INotTraced { public static readonly SilenceCheck Instance = new(); }

    /// <summary>A request passed on: who asked, and the request as it was asked.</summary>
    private sealed record Pending(IActorRef Asker, object Request);

    private readonly RemoteDevices.Setup _setup;
    private readonly WriteCredits _credits = new();
    private readonly Queue<IActorRef> _postedWriters = new();
    private readonly Dictionary<long, Pending> _pending = [];
    private long _lastId;
    private IActorRef _device = ActorRefs.Nobody;
    private bool _remote;
    private object? _lastState;
    private long _lastSequence;
    /// <summary>The remote device's count of posted writes handled, as its last effects said.</summary>
    private long _writesConfirmed;
    private long _reads;
    private long _writes;
    private string _location;
    /// <summary>Since when the remote device has said nothing while something waits for it (reset by
    /// anything it sends, and when waiting starts).</summary>
    private DateTime _quietSince = DateTime.UtcNow;
    private TimeSpan SilenceLimit => _setup.SilenceLimit ?? RemoteDevices.DefaultSilenceLimit;

    /// <summary>Requests or posted writes wait for the remote device.</summary>
    private bool Waiting => _remote && (_pending.Count > 0 || _postedWriters.Count > 0);

    /// <summary>Before a request goes to the device: if nothing waited, the quiet time starts now.</summary>
    private void BeforeSend()
    {
        if (!Waiting) _quietSince = DateTime.UtcNow;
    }

    /// <summary>Whether the message came from the device in use (not one this proxy left).</summary>
    private bool FromDevice()
    {
        var from = Sender is CarryingRef carrying ? carrying.Target : Sender;
        var device = _device is CarryingRef d ? d.Target : _device;
        if (!from.Equals(device)) return false;
        _quietSince = DateTime.UtcNow;
        return true;
    }

    public IStash Stash { get; set; } = null!;

    public ITimerScheduler Timers { get; set; } = null!;

    public RemoteDeviceProxy(RemoteDevices.Setup setup)
    {
        _setup = setup;
        _lastState = setup.InitialState;
        _location = $"on {NodeProtocol.NodeName(setup.Node)} (being placed)";
        Placing();
    }

    /// <summary>The VM's message trace, when it records one: the device's node then sends what the device
    /// receives (<see cref="RemoteDevices.TraceRecord"/>), and messages between the two carry their parents.</summary>
    private ITraceSink? _trace;

    protected override void PreStart()
    {
        byte[]? state = null;
        if (_setup.InitialState is { } initial) state = DeviceStateCodec.Encode(initial);
        _trace = MessageTraceRegistry.SinkFor(Context.System, Self);
        Context.ActorSelection(new RootActorPath(_setup.Node) / "user" / Control.ControlProtocol.DirectoryName)
            .Tell(new RemoteDevices.HostDevice(_setup.Vm, _setup.Device, _setup.Kind, state, _setup.IoApic, _setup.Pic, _setup.Events, Self,
                Traced: _trace is not null));
        Timers.StartSingleTimer(PlacementTimedOut.Instance, PlacementTimedOut.Instance, _setup.PlacementTimeout);
    }

    /// <summary>Waiting for the other node: requests wait (a vcpu reading the device waits with them).</summary>
    private void Placing()
    {
        Receive<RemoteDevices.DeviceHosted>(h =>
        {
            Timers.Cancel(PlacementTimedOut.Instance);
            // Traced: what goes to the device carries the id of the message the proxy is handling.
            _device = _trace is null ? h.Actor : CarryingRef.Around(h.Actor, Context.System);
            _remote = true;
            _location = $"on {NodeProtocol.NodeName(_setup.Node)}";
            Context.Watch(h.Actor);
            Timers.StartPeriodicTimer(SilenceCheck.Instance, SilenceCheck.Instance, SilenceLimit / 4);
            Context.GetLogger().Info("{0} runs on {1}", _setup.Device, NodeProtocol.NodeName(_setup.Node));
            Serve();
        });
        Receive<RemoteDevices.DeviceHostRefused>(r => RunHere($"{NodeProtocol.NodeName(_setup.Node)} refused it: {r.Why}"));
        Receive<PlacementTimedOut>(_ =>
            RunHere($"{NodeProtocol.NodeName(_setup.Node)} did not answer within {_setup.PlacementTimeout.TotalSeconds:0} s"));
        Receive<RemoteDevices.DeviceEffects>(OnEffects);
        Receive<GetStats>(_ => Sender.Tell(new Stats(_setup.Device, _reads, _writes, _location)));
        ReceiveAny(_ => Stash.Stash());
    }

    /// <summary>Passing the protocol through to the device, wherever it is now.</summary>
    private void Serve()
    {
        Become(() =>
        {
            Receive<Write>(w =>
            {
                if (Held()) return;
                _writes++;
                BeforeSend();
                _postedWriters.Enqueue(Sender);
                _device.Tell(w);
            });
            Receive<Read>(r =>
            {
                if (Held()) return;
                _reads++;
                BeforeSend();
                _device.Tell(r with { Id = Remember(r) });
            });
            Receive<WriteAndWait>(w =>
            {
                if (Held()) return;
                _writes++;
                BeforeSend();
                _device.Tell(w with { Id = Remember(w) });
            });
            Receive<Sync>(s =>
            {
                if (Held()) return;
                BeforeSend();
                _device.Tell(s with { Id = Remember(s) });
            });
            // The state of a device on another node is the record it mirrored last, once a barrier shows
            // that everything before the request was handled (its effects came first): no record object
            // crosses the network but the checked JSON of the effects.
            Receive<GetState>(g =>
            {
                if (Held()) return;
                BeforeSend();
                if (_remote) _device.Tell(new Sync(Remember(g)));
                else _device.Tell(g with { Id = Remember(g) });
            });
            Receive<Acknowledge>(a =>
            {
                if (Held()) return;
                BeforeSend();
                _device.Tell(a with { Id = Remember(a) });
            });
            Receive<BackendReady>(b =>
            {
                if (Held()) return;
                BeforeSend();
                _device.Tell(b with { Id = Remember(b) });
            });
            // Answers count only from the device in use: one this proxy left (taken as lost while it was
            // silent) may still answer, and its answers settle nothing any more.
            Receive<ReadResult>(r => Answer(r.Id, original => new ReadResult(((Read)original).Id, r.Value)), _ => FromDevice());
            Receive<WriteDone>(d => Answer(d.Id, original => new WriteDone(((WriteAndWait)original).Id, d.MachineEnding)), _ => FromDevice());
            Receive<Completed>(c => Answer(c.Id, original => original is GetState g
                ? new StateReply(g.Id, _setup.Device, _lastState)
                : new Completed(IdOf(original))), _ => FromDevice());
            Receive<StateReply>(s => Answer(s.Id, original => s with { Id = ((GetState)original).Id }), _ => FromDevice());
            Receive<Acknowledged>(a => Answer(a.Id, original => a with { Id = ((Acknowledge)original).Id }), _ => FromDevice());
            Receive<ReadResult>(_ => { });
            Receive<WriteDone>(_ => { });
            Receive<Completed>(_ => { });
            Receive<StateReply>(_ => { });
            Receive<Acknowledged>(_ => { });
            Receive<SilenceCheck>(_ =>
            {
                if (!_remote)
                {
                    Timers.Cancel(SilenceCheck.Instance);
                    return;
                }
                if (!Waiting || DateTime.UtcNow - _quietSince < SilenceLimit) return;
                if (NodeIsUnreachable())
                {
                    // The cluster decides about a node its failure detector lost: removed, the device moves
                    // here (Terminated); reachable again, it goes on there.
                    _quietSince = DateTime.UtcNow;
                    return;
                }
                // Whatever became of the requests, the device there is not used again.
                (_device is CarryingRef carrying ? carrying.Target : _device).Tell(PoisonPill.Instance);
                Failover($"it answered nothing for {SilenceLimit.TotalSeconds:0} s while requests waited on {NodeProtocol.NodeName(_setup.Node)}");
            });
            Receive<WriteCredit>(c =>
            {
                // A device on another node confirms its writes with their effects instead (OnEffects).
                if (_remote || !FromDevice()) return;
                for (var i = 0; i < c.Count && _postedWriters.TryDequeue(out var writer); i++) _credits.Posted(writer);
            });
            Receive<RemoteDevices.DeviceEffects>(OnEffects);
            // A placement that answered after its time was up: that device is not used, so it goes.
            Receive<RemoteDevices.DeviceHosted>(h => h.Actor.Tell(PoisonPill.Instance));
            Receive<RemoteDevices.TraceRecord>(r => _trace?.Record(r.Id, r.Parent, r.Sender, r.Receiver, r.Message));
            Receive<RemoteDevices.HostedDeviceFailed>(f =>
                _setup.Events.Tell(new VmProtocol.ChildRestarted(_setup.Device, $"{f.Cause} (on {NodeProtocol.NodeName(_setup.Node)})")));
            Receive<GetStats>(_ => Sender.Tell(new Stats(_setup.Device, _reads, _writes, _location)));
            Receive<Terminated>(t =>
            {
                if (!t.ActorRef.Equals(_device is CarryingRef carrying ? carrying.Target : _device)) return;
                if (!_remote)
                {
                    // The device beside the VM kept failing (or is stopping with the VM): so does its
                    // proxy, and the VM, watching it, ends as when any device fails for good.
                    Context.Stop(Self);
                    return;
                }
                Failover(t.AddressTerminated || !NodeIsUp()
                    ? $"its node {NodeProtocol.NodeName(_setup.Node)} was lost"
                    : $"it stopped on {NodeProtocol.NodeName(_setup.Node)}");
            });
            // Everything else (host input, health, fault injection) goes to the device as it is.
            ReceiveAny(m =>
            {
                if (!Held()) _device.Forward(m);
            });
        });
        _holding = false;
        Stash.UnstashAll();
    }

    /// <summary>
    /// Posted writes a device on another node may have unconfirmed (sent, not yet credited back or
    /// answered behind): what a lost node can take with it. Beyond it, requests wait here in order (the
    /// vcpus' own windows bound them) and go to the device as its credits come back, or to the device
    /// built here if its node is lost, so none of them is lost.
    /// </summary>
    public const int RemoteWriteWindow = 256;

    /// <summary>Requests are held here (stashed, in order) while the remote window is full.</summary>
    private bool _holding;

    /// <summary>Holds the current message if requests are being held or the remote window is full.</summary>
    private bool Held()
    {
        if (!_holding && !(_remote && _postedWriters.Count >= RemoteWriteWindow)) return false;
        _holding = true;
        Stash.Stash();
        return true;
    }

    /// <summary>The window has room again: the held requests go first, in order.</summary>
    private void Release()
    {
        if (!_holding || _postedWriters.Count >= RemoteWriteWindow) return;
        _holding = false;
        Stash.UnstashAll();
    }

    /// <summary>Whether the device's node is still an Up member (a downed node stops its actors as it
    /// shuts down, which can reach the proxy before the node is removed).</summary>
    private bool NodeIsUp() =>
        Akka.Cluster.Cluster.Get(Context.System).State.Members.Any(m => m.Address.Equals(_setup.Node) && m.Status == Akka.Cluster.MemberStatus.Up);

    private bool NodeIsUnreachable() =>
        Akka.Cluster.Cluster.Get(Context.System).State.Unreachable.Any(m => m.Address.Equals(_setup.Node));

    private long Remember(object request)
    {
        var id = ++_lastId;
        _pending[id] = new Pending(Sender, request);
        return id;
    }

    private static long IdOf(object request) => request switch
    {
        Sync s => s.Id,
        BackendReady b => b.Id,
        _ => throw new InvalidOperationException($"no Completed answers a {request.GetType().Name}"),
    };

    /// <summary>The device answered request <paramref name="id"/>: every posted write before it is handled
    /// (FIFO), so the asker's window is acknowledged; the asker hears the answer with its own id.</summary>
    private void Answer(long id, Func<object, object> answer)
    {
        while (_postedWriters.TryDequeue(out var writer)) _credits.Posted(writer);
        Release();
        if (!_pending.Remove(id, out var pending)) return; // an answer from a device that is no longer asked
        _credits.Replied(pending.Asker);
        pending.Asker.Tell(answer(pending.Request));
    }

    private void OnEffects(RemoteDevices.DeviceEffects effects)
    {
        if (!_device.IsNobody() && !FromDevice()) return; // a device this proxy no longer uses
        if (effects.Sequence <= _lastSequence) return;
        _lastSequence = effects.Sequence;
        // The posted writes handled since the last effects are confirmed: their effects are here.
        for (var n = effects.WritesHandled - _writesConfirmed; n > 0 && _postedWriters.TryDequeue(out var writer); n--) _credits.Posted(writer);
        _writesConfirmed = Math.Max(_writesConfirmed, effects.WritesHandled);
        Release();
        foreach (var b in effects.Output) _setup.Output(b);
        if (effects.State is not { } json) return;
        try { _lastState = DeviceStateCodec.Decode(json); }
        catch (SnapshotStateException e)
        {
            // Kept: the last good record. A device that sends a bad one would restart from it here.
            Context.GetLogger().Warning("{0} on {1} sent a state record that is not valid ({2}); keeping the last good one",
                _setup.Device, NodeProtocol.NodeName(_setup.Node), e.Message);
        }
    }

    /// <summary>The device's node is gone: settle what was in flight, then run the device here from its
    /// last state record.</summary>
    private void Failover(string why)
    {
        var lostWrites = _postedWriters.Count;
        while (_postedWriters.TryDequeue(out var writer)) _credits.Posted(writer);
        var resend = new List<(IActorRef Asker, object Request)>();
        foreach (var (_, pending) in _pending.OrderBy(p => p.Key))
        {
            switch (pending.Request)
            {
                case Read r:
                    _credits.Replied(pending.Asker);
                    pending.Asker.Tell(new ReadResult(r.Id, AccessSize.AllOnes(r.Size)));
                    break;
                case WriteAndWait w:
                    lostWrites++;
                    _credits.Replied(pending.Asker);
                    pending.Asker.Tell(new WriteDone(w.Id, MachineEnding: false));
                    break;
                default:
                    resend.Add((pending.Asker, pending.Request));
                    break;
            }
        }
        _pending.Clear();
        Context.GetLogger().Warning("{0}: {1}; {2} write(s) in flight were lost; it runs on this node now, from its last state record",
            _setup.Device, why, lostWrites);
        RunHere($"{why}; {lostWrites} write(s) in flight lost", restored: true);
        foreach (var (asker, request) in resend) Self.Tell(request, asker);
    }

    /// <summary>Builds the device on this node from the last state record and serves through it.</summary>
    private void RunHere(string why, bool restored = false)
    {
        Timers.Cancel(PlacementTimedOut.Instance);
        Timers.Cancel(SilenceCheck.Instance);
        _device = Context.ActorOf(_setup.LocalProps(_lastState), "here");
        _remote = false;
        Context.Watch(_device);
        _location = $"on this node: {why}";
        if (!restored) Context.GetLogger().Warning("{0} runs on this node: {1}", _setup.Device, why);
        _setup.Events.Tell(new VmProtocol.ChildRestarted(_setup.Device, $"moved to the VM's node: {why}"));
        Serve();
    }

    /// <summary>The device built here is supervised as the VM supervises its devices.</summary>
    protected override SupervisorStrategy SupervisorStrategy()
    {
        var events = _setup.Events;
        var device = _setup.Device;
        return RemoteDevices.DeviceSupervision(cause => events.Tell(new VmProtocol.ChildRestarted(device, cause)));
    }
}

