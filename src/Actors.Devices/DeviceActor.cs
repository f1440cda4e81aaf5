using Akka.Actor;
using ActorVmm.Devices.Tracing;
using static ActorVmm.Devices.DeviceProtocol;

namespace ActorVmm.Devices;

/// <summary>
/// The thin actor around a device model: checks access sizes, delegates, answers reads,
/// returns write credits and forwards the model's platform requests. No register logic here.
/// Built with a clock (<see cref="TimedDeviceProtocol"/>), it also keeps one timer for a model
/// that is an <see cref="ITimedDevice"/>: set for its next deadline after every message, calling
/// <see cref="ITimedDevice.OnDeadline"/> when it fires.
/// Requests to other actors (<see cref="IDeviceRequests"/>: a page flush, a barrier behind an
/// interrupt line's change) are counted until answered; a waited write's <see cref="WriteDone"/>
/// is held until every request made up to it is answered, so the guest's next instruction runs
/// after their effect, as it would after the write on hardware.
/// </summary>
internal sealed class DeviceActor : ReceiveActor, IWithTimers, IWithUnboundedStash
{
    /// <summary>Host input held for a guest that is not reading, at most.</summary>
    public const int MaxPendingInput = 64 * 1024;

    private readonly string _name;
    private readonly IBusDevice _model;
    private readonly WriteCredits _credits = new();
    private byte[] _pendingInput = [];
    private long _reads;
    private long _writes;

    private readonly StateCell _cell;
    private readonly EventsToActor _platform;
    private readonly IActorRef? _memory;
    private readonly IDeviceMirror? _mirror;
    /// <summary>The message being handled is a posted write that reached the model (for the mirror).</summary>
    private bool _postedWrite;

    // Requests to other actors not yet answered, and the waited writes whose answer waits for them
    // (in order: each with the last request id made before it was answered).
    private readonly HashSet<long> _outstanding = [];
    private readonly Queue<(IActorRef Writer, WriteDone Done, long LastRequest)> _heldWrites = new();

    // Timed models only: the clock their deadlines are in, and the deadline the timer is set for.
    private readonly ITimedDevice? _timed;
    private readonly IDeviceClock? _clock;
    private TimeSpan? _armedFor;

    public ITimerScheduler Timers { get; set; } = null!;

    public IStash Stash { get; set; } = null!;

    public DeviceActor(string name, Func<IPlatformEvents, IBusDevice> factory,
        Func<IPlatformEvents, object, IBusDevice>? restore, IActorRef events, StateCell cell)
        : this(name, factory, restore, events, cell, clock: null, memory: null)
    {
    }

    /// <param name="memory">the owner of guest memory (the vmspace): on a restart it is told
    /// <see cref="DeviceRestarting"/> and releases this device's page holds</param>
    /// <param name="name">device name used in messages and traces ("uart0")</param>
    /// <param name="factory">builds the model; called once per incarnation without a saved state</param>
    /// <param name="restore">builds the model from the state its last incarnation saved; null: from power-on</param>
    /// <param name="events">receives the guest's exit, reset and power-off requests</param>
    /// <param name="cell">what outlives an incarnation: the saved state, restart counts, request ids</param>
    /// <param name="clock">the clock of a timed model's deadlines; null: its deadlines are not armed</param>
    /// <param name="mirror">told after every message and every new incarnation (<see cref="IDeviceMirror"/>); null: none</param>
    public DeviceActor(string name, Func<IPlatformEvents, IBusDevice> factory,
        Func<IPlatformEvents, object, IBusDevice>? restore, IActorRef events, StateCell cell, IDeviceClock? clock,
        IActorRef? memory, IDeviceMirror? mirror = null)
    {
        _name = name;
        _cell = cell;
        _memory = memory;
        _mirror = mirror;
        var platform = new EventsToActor(name, events, memory, Self, cell, _outstanding);
        _platform = platform;
        if (cell.State is { } saved && restore is not null)
        {
            // A restart: continue from the state the last incarnation saved.
            _model = restore(platform, saved);
            if (cell.Restarts > 0) cell.Restored++; // not the first incarnation's initial state
        }
        else _model = factory(platform);
        cell.State = null;
        if (clock is not null && _model is ITimedDevice timed)
        {
            _timed = timed;
            _clock = clock;
        }

        Receive<Write>(w =>
        {
            _writes++;
            _postedWrite = true;
            _credits.Posted(Sender);
            if (Forwarded(w.Offset, w.Size, offset => w with { Offset = offset })) return;
            if (AccessSize.IsValid(w.Size)) _model.Write(w.Offset, w.Size, w.Value);
            DrainInput();
            Rearm();
        });
        Receive<WriteAndWait>(w =>
        {
            _writes++;
            _credits.Replied(Sender);
            if (Forwarded(w.Offset, w.Size, offset => w with { Offset = offset })) return; // the device answers the writer
            _platform.Requests = 0;
            try
            {
                if (AccessSize.IsValid(w.Size)) _model.Write(w.Offset, w.Size, w.Value);
            }
            catch
            {
                Sender.Tell(new WriteDone(w.Id, _platform.Requests > 0)); // never leave the vcpu waiting
                throw;
            }
            var done = new WriteDone(w.Id, _platform.Requests > 0);
            if (_outstanding.Count == 0 && _heldWrites.Count == 0) Sender.Tell(done);
            else _heldWrites.Enqueue((Sender, done, _cell.LastRequestId)); // answered with its requests
            DrainInput();
            Rearm();
        });
        Receive<Completed>(c =>
        {
            if (!_outstanding.Remove(c.Id)) return; // an answer to a past incarnation
            ReleaseHeldWrites();
        });
        Receive<Sync>(s => Sender.Tell(new Completed(s.Id)));
        Receive<Read>(r =>
        {
            _reads++;
            if (Forwarded(r.Offset, r.Size, offset => r with { Offset = offset }))
            {
                _credits.Replied(Sender); // the device's answer acknowledges every earlier write to this one too (FIFO)
                return;
            }
            ulong value;
            try
            {
                value = AccessSize.IsValid(r.Size) ? _model.Read(r.Offset, r.Size) : ulong.MaxValue;
            }
            catch
            {
                // A failing model must not leave the vcpu waiting: it reads all-ones (as from an
                // absent device), then the supervisor restarts this actor.
                Sender.Tell(new ReadResult(r.Id, AccessSize.AllOnes(r.Size)));
                throw;
            }
            _credits.Replied(Sender);
            Sender.Tell(new ReadResult(r.Id, AccessSize.Mask(value, r.Size)));
            DrainInput();
            Rearm();
        });
        Receive<HostInput>(i =>
        {
            if (_model is not IHostInput) return; // nothing here takes input: drop it
            var room = MaxPendingInput - _pendingInput.Length;
            if (room <= 0) return; // the guest is not reading: the host's bytes are dropped, not hoarded
            var take = i.Data.AsSpan(0, Math.Min(room, i.Data.Length));
            _pendingInput = [.. _pendingInput, .. take];
            DrainInput();
        });
        Receive<BackendReady>(b =>
        {
            try
            {
                (_model as IBackendInput)?.BackendReady();
            }
            finally
            {
                Sender.Tell(new Completed(b.Id)); // the watcher goes on watching, even after a failure
            }
            Rearm();
        });
        // Interrupt-controller adapters: a model without the interface ignores them.
        Receive<SetIrqLevel>(m =>
        {
            if ((_model as IInterruptInputs)?.Input(m.Line) is not { } line) return;
            if (m.Level) line.Assert();
            else line.Deassert();
            Rearm();
        });
        Receive<PulseIrq>(m =>
        {
            (_model as IInterruptInputs)?.Input(m.Line)?.Pulse();
            Rearm();
        });
        Receive<EndOfInterrupt>(e =>
        {
            (_model as IEndOfInterrupt)?.EndOfInterrupt(e.Vector);
            Rearm();
        });
        Receive<Acknowledge>(a =>
        {
            if (_model is not IInterruptAcknowledge inta)
            {
                Sender.Tell(new Acknowledged(a.Id, null, false));
                return;
            }
            var vector = inta.Acknowledge();
            Sender.Tell(new Acknowledged(a.Id, vector, inta.InterruptRequested));
            Rearm();
        });
        Receive<GetState>(g =>
        {
            if (_model is not IStatefulDevice stateful)
            {
                Sender.Tell(new StateReply(g.Id, _name, null));
                return;
            }
            try
            {
                Sender.Tell(new StateReply(g.Id, _name, stateful.SaveState()));
            }
            catch (Exception e)
            {
                // The asker is answered either way; the model's failure is its supervisor's business.
                Sender.Tell(new StateReply(g.Id, _name, null, $"{_name} could not save its state: {e.Message}"));
                throw;
            }
            Rearm(); // saving brings a timed model up to now (flags, edges), which may move its deadline
        });
        Receive<GetStats>(_ => Sender.Tell(new Stats(_name, _reads, _writes)));
        Receive<GetHealth>(_ => Sender.Tell(new Health(_name, _cell.Restarts, _cell.Restored)));
        Receive<FaultProtocol.Crash>(Faults.Crash);
        // A stall blocks no thread: this actor may run on whatever thread sent to it (InlineDispatcher).
        // What arrives meanwhile, its timer's deadline included, waits and is handled after, in
        // order, as by a device whose thread the host descheduled; a vcpu reading it waits.
        Receive<FaultProtocol.Stall>(s => Faults.StallStashing(s, Context, Stash, Timers, _name));
        Receive<DeadlineReached>(_ =>
        {
            _armedFor = null;
            _timed?.OnDeadline();
            Rearm();
        });
    }

    /// <summary>A model restored from a state record may have a deadline already.</summary>
    protected override void PreStart()
    {
        Rearm();
        _mirror?.Handled(_model, postedWrite: false);
    }

    /// <summary>The mirror sees the model after each message (not after one that failed: the restart's
    /// new incarnation is shown to it instead).</summary>
    protected override bool AroundReceive(Receive receive, object message)
    {
        _postedWrite = false;
        var handled = base.AroundReceive(receive, message);
        _mirror?.Handled(_model, _postedWrite);
        return handled;
    }

    /// <summary>A restart forgets the counts: return them now so no vcpu's write window leaks. The
    /// guest pages this incarnation held are released too: the vmspace watches holders for
    /// Terminated, which a restart (same ref) never sends.</summary>
    protected override void PreRestart(Exception reason, object message)
    {
        _cell.Restarts++;
        if (_memory is { } memory && !memory.IsNobody()) memory.Tell(new DeviceRestarting(_name), Self);
        if (_model is IStatefulDevice stateful)
        {
            try { _cell.State = stateful.SaveState(); }
            catch (Exception) { _cell.State = null; } // a model too broken to save restarts from power-on
        }
        _credits.ReturnAll();
        // Never leave a vcpu waiting: the answers to this incarnation's requests will find nobody.
        while (_heldWrites.TryDequeue(out var held)) held.Writer.Tell(held.Done);
        _outstanding.Clear();
        base.PreRestart(reason, message);
    }

    /// <summary>
    /// An access an <see cref="IForwardingDevice"/> says is another device's: told to that sibling
    /// (the VM's device actors are siblings) with the original sender, after everything this actor
    /// handled before it, so it lands behind every earlier access of the sender to either device.
    /// </summary>
    private bool Forwarded(ulong offset, int size, Func<ulong, object> at)
    {
        if (_model is not IForwardingDevice forwarding || !forwarding.TryForward(offset, size, out var device, out var deviceOffset))
            return false;
        if (!_peers.TryGetValue(device, out var peer)) _peers[device] = peer = Context.ActorSelection("../" + device);
        peer.Tell(at(deviceOffset), Sender);
        return true;
    }

    private readonly Dictionary<string, ActorSelection> _peers = new(StringComparer.Ordinal);

    /// <summary>Answers the held writes, oldest first, whose requests have all been answered.</summary>
    private void ReleaseHeldWrites()
    {
        var oldestOutstanding = _outstanding.Count == 0 ? long.MaxValue : _outstanding.Min();
        while (_heldWrites.TryPeek(out var held) && held.LastRequest < oldestOutstanding)
        {
            _heldWrites.Dequeue();
            held.Writer.Tell(held.Done);
        }
    }

    /// <summary>
    /// One timer for the model's next deadline, reset only when the deadline moved; a deadline
    /// already past fires at once. Early or late callbacks are the model's business.
    /// </summary>
    private void Rearm()
    {
        if (_timed is null || _clock is null) return;
        var next = _timed.NextDeadline;
        if (next == _armedFor) return;
        _armedFor = next;
        if (next is not { } deadline)
        {
            Timers.Cancel(DeadlineReached.Instance);
            return;
        }
        var delay = deadline - _clock.Now;
        Timers.StartSingleTimer(DeadlineReached.Instance, DeadlineReached.Instance, delay > TimeSpan.Zero ? delay : TimeSpan.Zero);
    }

    /// <summary>Host input waits here (bounded by the host's reader) until the model has room.</summary>
    private void DrainInput()
    {
        if (_pendingInput.Length == 0 || _model is not IHostInput input) return;
        var taken = input.OfferInput(_pendingInput);
        _pendingInput = taken >= _pendingInput.Length ? [] : _pendingInput[taken..];
    }

    private sealed class DeadlineReached : INotTraced
    {
        public static readonly DeadlineReached Instance = new();
    }

    /// <param name="memory">the owner of guest memory (page flushes go there); null: none, flushes are ignored</param>
    /// <param name="outstanding">the actor's requests not yet answered; ids come from <paramref name="cell"/></param>
/// <param name="device">the device's name, in its requests</param>
/// <param name="target">receives the exit, reset and power-off requests</param>
/// <param name="self">the device actor, the sender of its requests</param>
/// <param name="cell">where request ids come from</param>
    private sealed class EventsToActor(string device, IActorRef target, IActorRef? memory, IActorRef self, StateCell cell,
        HashSet<long> outstanding) : IPlatformEvents, IDeviceRequests
    {
        /// <summary>Exit, reset and power-off requests made since the actor last cleared it.</summary>
        public int Requests;

        public void RequestPageFlush(ulong gpa)
        {
            if (memory is null || memory.IsNobody()) return;
            Send(memory, id => new FlushGuestPage(device, id, gpa));
        }

        public void Send(IActorRef to, Func<long, object> request)
        {
            if (to.IsNobody()) return; // no one would ever answer
            var id = ++cell.LastRequestId;
            outstanding.Add(id);
            to.Tell(request(id), self);
        }

        public void RequestExit(int status, string reason)
        {
            Requests++;
            target.Tell(new GuestExitRequested(device, status, reason));
        }

        public void RequestReset(string reason)
        {
            Requests++;
            target.Tell(new GuestResetRequested(device, reason));
        }

        public void RequestPowerOff(string reason)
        {
            Requests++;
            target.Tell(new GuestPowerOffRequested(device, reason));
        }
    }
}
