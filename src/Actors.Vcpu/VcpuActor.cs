using Akka.Actor;
using ActorVmm.Devices;
using ActorVmm.Devices.Tracing;
using ActorVmm.LibVmm;
using static ActorVmm.Vcpu.VcpuProtocol;

namespace ActorVmm.Vcpu;

/// <summary>
/// One vcpu. Its loop is a self-message: Run → KVM_RUN → handle the exit → Run. Everything else
/// (pause, interrupts, register requests, device replies) is handled between two runs, on the
/// vcpu's pinned thread. Writes are posted; reads wait for the reply by correlation id and stash
/// what else arrives meanwhile.
///
/// States (the seed's vcpu states, Firecracker's explicit machine):
///   Created --Start--> Running --HLT--> Halted --Notify/Inject--> Running
///   Running|Halted|Created --Pause--> Paused --Resume--> (previous)
///   any --Stop or fatal exit--> Stopped
/// Running has two waiting sub-states: a read in flight, a device's write window full.
/// </summary>
internal sealed class VcpuActor : UntypedActor, IWithUnboundedStash
{
    private sealed class Run : INotTraced
    {
        public static readonly Run Instance = new();
    }

    private readonly IVcpu _vcpu;
    private readonly Wiring _wiring;
    private readonly Dictionary<IActorRef, DeviceRoute> _routesByDevice = new();
    private readonly Queue<byte> _pendingVectors = new();

    private State _state = State.Created;
    private State _resumeTo = State.Created;

    // The read in flight: its id, the device, and for IN with count > 1 the element index.
    private long _nextReadId;
    private long _readId;
    private DeviceRoute? _readRoute;
    private VmExit? _readExit;
    private int _readIndex;
    private DeviceRoute? _blockedOn;
    private bool _wakePending;

    private long _exits, _ioExits, _mmioExits, _hltExits, _intrExits, _unassignedReads, _unassignedWrites, _injected;

    public IStash Stash { get; set; } = null!;

    private Akka.Dispatch.MessageQueues.IMessageQueue _mailbox = null!;
    private ITraceSink? _trace;

    public VcpuActor(IVcpu vcpu, Wiring wiring)
    {
        _vcpu = vcpu;
        _wiring = wiring;
        foreach (var (_, _, route) in wiring.Ports.Entries) _routesByDevice[route.Device] = route;
        foreach (var (_, _, route) in wiring.Mmio.Entries) _routesByDevice[route.Device] = route;
        Become(Created);
    }

    private int Id => _vcpu.Id;

    protected override void PreStart()
    {
        try { Thread.CurrentThread.Name = $"vcpu-{Id}"; }
        catch (InvalidOperationException) { /* a pooled thread in unit tests may already be named */ }
        VcpuKickRegistry.Register(Self, _vcpu);
        _mailbox = ((ActorCell)Context).Mailbox.MessageQueue;
        _trace = MessageTraceRegistry.SinkFor(Self);
    }

    protected override void PostStop() => VcpuKickRegistry.Unregister(Self);

    protected override void OnReceive(object message) => Unhandled(message);

    // ---- states ----

    private void Created(object message)
    {
        switch (message)
        {
            case Start:
                _vcpu.BindToCurrentThread();
                // Created --Start--> Running
                EnterRunning();
                break;
            default:
                Common(message);
                break;
        }
    }

    private void Running(object message)
    {
        switch (message)
        {
            case Run:
                Step();
                break;
            case Notify:
                // Running: the event may race with a HLT the guest is executing now; remember it
                // so that HLT does not sleep through it (a spurious wake-up from HLT is allowed).
                _wakePending = true;
                break;
            default:
                Common(message);
                break;
        }
    }

    private void Halted(object message)
    {
        switch (message)
        {
            case Notify:
                // Halted --Notify--> Running
                EnterRunning();
                break;
            case InjectInterrupt inject:
                _pendingVectors.Enqueue(inject.Vector);
                // Halted --InjectInterrupt--> Running
                EnterRunning();
                break;
            default:
                Common(message);
                break;
        }
    }

    private void Paused(object message)
    {
        switch (message)
        {
            case Resume:
                // Paused --Resume--> previous state
                Sender.Tell(new Resumed(Id));
                if (_resumeTo == State.Running) EnterRunning();
                else if (_resumeTo == State.Halted) EnterHalted();
                else { _state = State.Created; Become(Created); }
                break;
            case Notify:
                if (_resumeTo == State.Halted) _resumeTo = State.Running;
                break;
            case InjectInterrupt inject:
                _pendingVectors.Enqueue(inject.Vector);
                if (_resumeTo == State.Halted) _resumeTo = State.Running;
                break;
            case Pause:
                Sender.Tell(new VcpuProtocol.Paused(Id));
                break;
            default:
                Common(message);
                break;
        }
    }

    private void Stopped(object message)
    {
        switch (message)
        {
            case GetRegisters:
                ReplyRegisters();
                break;
            case GetStats:
                ReplyStats();
                break;
            case Run or DeviceProtocol.ReadResult or DeviceProtocol.WriteCredit or Notify or InjectInterrupt:
                break;
            case Stop:
                Sender.Tell(new VcpuProtocol.Stopped(Id, StopReason.Requested, $"vcpu {Id} already stopped"));
                break;
            default:
                Sender.Tell(new Refused(Id, message.GetType().Name, "vcpu is stopped"));
                break;
        }
    }

    /// <summary>A read is in flight: only its reply (and credits, and Stop) are handled.</summary>
    private void WaitingForRead(object message)
    {
        switch (message)
        {
            case DeviceProtocol.ReadResult result when result.Id == _readId:
                CompleteRead(result.Value);
                break;
            case DeviceProtocol.ReadResult:
                break; // a stale reply
            case DeviceProtocol.WriteCredit credit:
                ApplyCredit(credit);
                break;
            case Stop:
                StopWith(StopReason.Requested, $"vcpu {Id} stopped on request (a read was in flight)");
                break;
            case Run:
                break;
            default:
                Stash.Stash();
                break;
        }
    }

    /// <summary>The write window to <see cref="_blockedOn"/> is full: wait for credit.</summary>
    private void WaitingForCredit(object message)
    {
        switch (message)
        {
            case DeviceProtocol.WriteCredit credit:
                ApplyCredit(credit);
                if (_blockedOn is null || _blockedOn.InFlight < DeviceProtocol.WriteWindow)
                {
                    _blockedOn = null;
                    Stash.UnstashAll();
                    EnterRunning();
                }
                break;
            case Stop:
                StopWith(StopReason.Requested, $"vcpu {Id} stopped on request (waiting for device credit)");
                break;
            case Run:
                break;
            default:
                Stash.Stash();
                break;
        }
    }

    /// <summary>Requests every state but Stopped answers the same way.</summary>
    private void Common(object message)
    {
        switch (message)
        {
            case Pause:
                // Running|Halted|Created --Pause--> Paused
                _resumeTo = _state;
                _state = State.Paused;
                Become(Paused);
                Sender.Tell(new VcpuProtocol.Paused(Id));
                break;
            case Resume:
                Sender.Tell(new Resumed(Id));
                break;
            case Stop:
                StopWith(StopReason.Requested, $"vcpu {Id} stopped on request");
                break;
            case GetRegisters:
                ReplyRegisters();
                break;
            case SetRegisters set:
                try
                {
                    if (set.Registers is { } r) _vcpu.SetRegisters(r.ToKvm());
                    if (set.Special is { } s) _vcpu.SetSpecialRegisters(s.ApplyTo(_vcpu.GetSpecialRegisters()));
                    Sender.Tell(new RegistersSet(Id));
                }
                catch (KvmException e)
                {
                    Sender.Tell(new Refused(Id, nameof(SetRegisters), e.Message));
                }
                break;
            case InjectInterrupt inject:
                _pendingVectors.Enqueue(inject.Vector);
                break;
            case GetStats:
                ReplyStats();
                break;
            case DeviceProtocol.WriteCredit credit:
                ApplyCredit(credit);
                break;
            case FaultProtocol.Crash crash:
                throw new InjectedFaultException(crash.Reason);
            case Start or Notify or Run or DeviceProtocol.ReadResult:
                break;
            default:
                Unhandled(message);
                break;
        }
    }

    // ---- the run loop ----

    private void EnterRunning()
    {
        _state = State.Running;
        Become(Running);
        Self.Tell(Run.Instance);
    }

    private void EnterHalted()
    {
        _state = State.Halted;
        Become(Halted);
    }

    /// <summary>Exits handled in one turn before the actor yields to its dispatcher (system messages).</summary>
    private const int MaxExitsPerTurn = 256;

    /// <summary>
    /// Runs the guest until an exit needs a reply or a state change, or a message is waiting.
    /// While the mailbox is empty the vcpu re-enters at once instead of telling itself Run: a
    /// message that needs the vcpu kicks it, so it is seen before the next entry either way.
    /// </summary>
    private void Step()
    {
        for (var i = 0; i < MaxExitsPerTurn; i++)
        {
            if (!RunOnce()) return;
            if (_mailbox.HasMessages) break;
        }
        Self.Tell(Run.Instance);
    }

    /// <summary>One KVM_RUN and its exit. True when the vcpu should simply run again.</summary>
    private bool RunOnce()
    {
        InjectPendingInterrupt();
        VmExit exit;
        try
        {
            exit = _vcpu.Run();
        }
        catch (Exception e)
        {
            StopWith(StopReason.RunFailed, $"vcpu {Id} stopped: KVM_RUN failed: {e.Message}");
            return false;
        }
        _exits++;
        if (_trace is not null) TraceExit(exit);
        var action = ExitHandler.Decide(exit, _wiring.Ports, _wiring.Mmio);
        switch (action.Kind)
        {
            case ExitActionKind.Reenter:
                if (exit is VmExit.Intr) _intrExits++;
                return true;
            case ExitActionKind.PostWrite:
                return PostWrites(exit, action);
            case ExitActionKind.Read:
                CountAccess(exit);
                _readRoute = action.Route;
                _readExit = exit;
                _readIndex = 0;
                SendRead(action.Offset, action.Size);
                Become(WaitingForRead);
                return false;
            case ExitActionKind.UnassignedRead:
                CountAccess(exit);
                _unassignedReads++;
                CompleteUnassignedRead(exit, action.Size);
                return true;
            case ExitActionKind.UnassignedWrite:
                CountAccess(exit);
                _unassignedWrites++;
                return true;
            case ExitActionKind.Halt:
                _hltExits++;
                return OnHalt();
            case ExitActionKind.MsrFault:
                if (exit is VmExit.MsrRead) _vcpu.CompleteMsrRead(0, fault: true);
                else _vcpu.CompleteMsrWrite(fault: true);
                return true;
            default:
                StopWith(action.StopReason, FailureReport.Build(Id, action.StopReason, exit, _vcpu, _wiring.Memory));
                return false;
        }
    }

    /// <summary>Records the exit as a trace event and makes it the causal parent of what follows.</summary>
    private void TraceExit(VmExit exit)
    {
        var e = exit switch
        {
            VmExit.Io io => new GuestExit(Id, io.IsOut ? "io-out" : "io-in", io.Port, io.Size, io.IsOut, io.Value),
            VmExit.Mmio m => new GuestExit(Id, m.IsWrite ? "mmio-write" : "mmio-read", m.Address, m.Length, m.IsWrite, m.Value),
            _ => new GuestExit(Id, exit.GetType().Name.ToLowerInvariant(), 0, 0, false, 0),
        };
        var id = TraceContext.Record(_trace!, Self, Self, e);
        TraceContext.Enter(Self, id);
    }

    private void CountAccess(VmExit exit)
    {
        if (exit is VmExit.Io) _ioExits++;
        else _mmioExits++;
    }

    /// <summary>Posts the write(s); false when the device's write window is full (the vcpu waits).</summary>
    private bool PostWrites(VmExit exit, ExitAction action)
    {
        var route = action.Route!;
        var device = route.Device;
        if (exit is VmExit.Io { Count: > 1, Data: { } data } io)
        {
            _ioExits++;
            for (var i = 0; i < io.Count; i++)
            {
                var value = LittleEndian(data.AsSpan(i * io.Size, io.Size));
                device.Tell(new DeviceProtocol.Write(action.Offset, io.Size, value), Self);
            }
            route.InFlight += (int)io.Count;
        }
        else
        {
            CountAccess(exit);
            var value = exit is VmExit.Io one ? one.Value : ((VmExit.Mmio)exit).Value;
            device.Tell(new DeviceProtocol.Write(action.Offset, action.Size, value), Self);
            route.InFlight++;
        }
        if (route.InFlight >= DeviceProtocol.WriteWindow)
        {
            // Running --window full--> waiting for credit (a flooding guest waits here).
            _blockedOn = route;
            Become(WaitingForCredit);
            return false;
        }
        return true;
    }

    private void SendRead(ulong offset, int size)
    {
        _readId = ++_nextReadId;
        _readRoute!.Device.Tell(new DeviceProtocol.Read(_readId, offset, size), Self);
    }

    private void CompleteRead(ulong value)
    {
        var route = _readRoute!;
        route.InFlight = 0; // the reply acknowledges every earlier write (FIFO)
        switch (_readExit)
        {
            case VmExit.Io io:
                _vcpu.CompleteIoIn(_readIndex, value);
                if (++_readIndex < io.Count)
                {
                    _wiring.Ports.TryResolve(io.Port, out _, out var offset);
                    SendRead(offset, io.Size);
                    return;
                }
                break;
            case VmExit.Mmio:
                _vcpu.CompleteMmioRead(value);
                break;
        }
        _readExit = null;
        _readRoute = null;
        Stash.UnstashAll();
        EnterRunning();
    }

    private void CompleteUnassignedRead(VmExit exit, int size)
    {
        var ones = ExitHandler.AllOnes(size);
        if (exit is VmExit.Io io)
            for (var i = 0; i < io.Count; i++) _vcpu.CompleteIoIn(i, ones);
        else
            _vcpu.CompleteMmioRead(ones);
    }

    private void ApplyCredit(DeviceProtocol.WriteCredit credit)
    {
        if (_routesByDevice.TryGetValue(Sender, out var route))
            route.InFlight = Math.Max(0, route.InFlight - credit.Count);
    }

    /// <summary>True when the vcpu should run on (an event is pending); false when it halts.</summary>
    private bool OnHalt()
    {
        if (_pendingVectors.Count > 0 || _wakePending)
        {
            _wakePending = false;
            return true;
        }
        // Running --HLT--> Halted. With IF=0 and nothing pending, only an NMI/INIT could wake
        // it: the VM decides whether that ends its run.
        EnterHalted();
        _wiring.Vm.Tell(new VcpuHalted(Id, InterruptsDisabled: !_vcpu.InterruptsEnabled));
        return false;
    }

    private void InjectPendingInterrupt()
    {
        if (_pendingVectors.Count == 0) return;
        if (_vcpu.ReadyForInterruptInjection)
        {
            _vcpu.InjectInterrupt(_pendingVectors.Dequeue());
            _injected++;
        }
        // KVM_EXIT_IRQ_WINDOW_OPEN is not reliable here: ask for it, and also re-check on every exit.
        _vcpu.RequestInterruptWindow = _pendingVectors.Count > 0;
    }

    private void StopWith(StopReason reason, string report)
    {
        // any --Stop/fatal--> Stopped
        _state = State.Stopped;
        Become(Stopped);
        Stash.UnstashAll();
        var stopped = new VcpuProtocol.Stopped(Id, reason, report);
        _wiring.Vm.Tell(stopped);
        if (!Sender.IsNobody() && !Sender.Equals(_wiring.Vm) && !Sender.Equals(Self)) Sender.Tell(stopped);
    }

    private void ReplyRegisters()
    {
        try
        {
            Sender.Tell(new Registers(Id, _state, RegisterState.From(_vcpu.GetRegisters()),
                SpecialRegisterState.From(_vcpu.GetSpecialRegisters())));
        }
        catch (KvmException e)
        {
            Sender.Tell(new Refused(Id, nameof(GetRegisters), e.Message));
        }
    }

    private void ReplyStats() =>
        Sender.Tell(new Stats(Id, _state, _exits, _ioExits, _mmioExits, _hltExits, _intrExits,
            _unassignedReads, _unassignedWrites, _injected));

    private static ulong LittleEndian(ReadOnlySpan<byte> bytes)
    {
        ulong v = 0;
        for (var i = bytes.Length - 1; i >= 0; i--) v = (v << 8) | bytes[i];
        return v;
    }
}
