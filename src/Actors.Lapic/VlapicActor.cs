using Akka.Actor;
using ActorVmm.Devices;
using static ActorVmm.Lapic.VlapicProtocol;

namespace ActorVmm.Lapic;

/// <summary>
/// The thin actor around one vcpu's <see cref="Vlapic"/>: delegates every message, then
/// (1) tells the vcpu the pending vector if it changed, (2) re-arms one timer for the backend's
/// next deadline. No register logic here.
/// </summary>
internal sealed class VlapicActor : ReceiveActor, IWithTimers
{
    private sealed record TimerTick
    {
        public static readonly TimerTick Instance = new();
    }

    private const string TimerKey = "lapic-timer";

    /// <summary>Longest single wait: a far deadline is re-armed on the early tick (models tolerate early callbacks).</summary>
    private static readonly TimeSpan MaxTimerDelay = TimeSpan.FromHours(1);

    private readonly int _vcpuId;
    private readonly Wiring _wiring;
    private readonly IDeviceClock _clock;
    private readonly Vlapic _apic;
    private readonly WriteCredits _credits = new();
    private readonly VlapicCell _cell;

    /// <summary>The vector last told to the vcpu and not yet accepted; null when none is.</summary>
    private int? _reported;

    /// <summary>The TPR the vcpu mirrors in CR8 (it starts at 0; unknown after a restart).</summary>
    private byte? _vcpuTpr = 0;

    /// <summary>The IA32_APIC_BASE the vcpu mirrors (it starts at the reset value; unknown after a restart).</summary>
    private ulong? _vcpuApicBase;

    /// <summary>The deadline the timer is armed for.</summary>
    private TimeSpan? _armed;

    public ITimerScheduler Timers { get; set; } = null!;

    public VlapicActor(int vcpuId, Wiring wiring, LapicBackendFactory backend, IDeviceClock? clock, VlapicCell cell)
    {
        _vcpuId = vcpuId;
        _wiring = wiring;
        _cell = cell;
        _clock = clock ?? new SchedulerClock(Context.System.Scheduler);
        _apic = backend(vcpuId, new EventsToActors(vcpuId, wiring, cell, Self), _clock);
        _vcpuApicBase = _apic.ApicBase;
        if (cell.State is { } saved)
        {
            // A restart, or a vlapic built from a snapshot: continue from that state. The vcpu
            // mirrors nothing of it yet.
            if (_apic.Kind == LapicBackendKind.KvmAssisted)
                throw new ArgumentException($"vlapic {vcpuId}: KVM's local APIC takes no initial state (it is restored with its vcpu)");
            _apic.Restore(saved);
            _reported = cell.Reported;
            _vcpuTpr = null;
            _vcpuApicBase = null;
            cell.State = null;
            cell.Reported = null;
        }

        Receive<AttachVcpu>(a =>
        {
            _cell.Vcpu = a.Vcpu;
            Changed(); // what it does not know yet: a pending vector, the TPR, IA32_APIC_BASE
        });
        // Fault injection: the vlapic fails; its supervisor restarts it from the state it saves.
        Receive<FaultProtocol.Crash>(Faults.Crash);
        Receive<DeliverToFirstMatch>(d =>
        {
            var to = d.Interrupt.To;
            // A matching APIC that would drop it (disabled) passes it on, as the arbitration would skip it.
            if ((to is null || _apic.Matches(to.Mode, to.Id)) && (_apic.AcceptsInterrupts || d.Rest.Length == 0))
            {
                _cell.Delivered++;
                _apic.Deliver(d.Interrupt.Mode, d.Interrupt.Vector, d.Interrupt.Level, d.Interrupt.Trigger);
                Changed();
            }
            else if (d.Rest.Length > 0)
            {
                d.Rest[0].Tell(d with { Rest = d.Rest.RemoveAt(0) }, Sender);
            }
        });

        Receive<DeviceProtocol.Write>(w =>
        {
            _credits.Posted(Sender);
            _apic.WriteMmio(w.Offset, w.Size, w.Value);
            Changed();
        });
        Receive<DeviceProtocol.WriteAndWait>(w =>
        {
            _credits.Replied(Sender);
            try
            {
                _apic.WriteMmio(w.Offset, w.Size, w.Value);
                Changed(); // a withdrawn vector reaches the vcpu before the reply does
            }
            finally
            {
                Sender.Tell(new DeviceProtocol.WriteDone(w.Id, MachineEnding: false)); // never leave the vcpu waiting
            }
        });
        Receive<DeviceProtocol.Read>(r =>
        {
            var value = _apic.ReadMmio(r.Offset, r.Size);
            _credits.Replied(Sender);
            Sender.Tell(new DeviceProtocol.ReadResult(r.Id, AccessSize.Mask(value, r.Size)));
            Changed();
        });
        Receive<MsrRead>(m =>
        {
            var ok = _apic.ReadMsr(m.Msr, out var value);
            Sender.Tell(new MsrReadResult(m.Id, ok, ok ? value : 0));
            Changed();
        });
        Receive<MsrWrite>(m =>
        {
            var ok = _apic.WriteMsr(m.Msr, m.Value, m.GuestTsc);
            TellApicBase(); // before the answer: the vcpu takes it in before the guest's next instruction
            Sender.Tell(new MsrWriteResult(m.Id, ok));
            Changed();
        });
        Receive<SetApicBase>(m =>
        {
            var ok = _apic.WriteMsr(ApicMsrs.ApicBase, m.Value);
            TellApicBase();
            Sender.Tell(new MsrWriteResult(m.Id, ok));
            Changed();
        });
        Receive<DeliverInterrupt>(d =>
        {
            if (d.To is { } to && !_apic.Matches(to.Mode, to.Id)) return;
            _cell.Delivered++;
            _apic.Deliver(d.Mode, d.Vector, d.Level, d.Trigger);
            Changed();
        });
        Receive<Lint>(l =>
        {
            if (_apic.Lint(l.Pin) is not { } line) return; // there are two LINT pins
            switch (l.Change)
            {
                case PinChange.Assert: line.Assert(); break;
                case PinChange.Deassert: line.Deassert(); break;
                default: line.Pulse(); break;
            }
            Changed();
        });
        Receive<InterruptAccepted>(a =>
        {
            _cell.Accepted++;
            _apic.InterruptAccepted(a.Vector);
            if (_reported == a.Vector) _reported = null;
            Changed();
        });
        Receive<EndOfInterrupt>(e =>
        {
            _apic.Eoi(e.Vector);
            Changed();
        });
        Receive<SetTaskPriority>(t =>
        {
            _apic.SetTaskPriority(t.Tpr);
            _vcpuTpr = t.Tpr;
            Changed();
        });
        Receive<GetStats>(_ => Sender.Tell(new Stats(_vcpuId, _cell.IpisSent, _cell.Delivered, _cell.Accepted,
            _cell.TimerCallbacks, _cell.Restarts)));
        Receive<TimerTick>(_ =>
        {
            _cell.TimerCallbacks++;
            _armed = null;
            _apic.OnDeadline();
            Changed();
        });
        Receive<GetState>(_ =>
        {
            // An in-kernel APIC is read by its vcpu, between two runs (the vcpu owns the fd's mutex in KVM_RUN).
            if (_apic.Kind == LapicBackendKind.KvmAssisted) _cell.Vcpu.Forward(new ReadKernelLapic(_vcpuId));
            else Sender.Tell(new StateReply(_vcpuId, _apic.State()));
        });
        Receive<RestoreState>(r =>
        {
            if (_apic.Kind == LapicBackendKind.KvmAssisted)
            {
                _cell.Vcpu.Forward(new WriteKernelLapic(_vcpuId, r.State));
                return;
            }
            _apic.Restore(r.State);
            _reported = null;
            Sender.Tell(new StateRestored(_vcpuId));
            Changed();
        });
    }

    /// <summary>After a restart the timer is armed again (it died with the failed incarnation) and a
    /// vector that became pending meanwhile is told; on a first start there is nothing to do.</summary>
    protected override void PreStart() => Changed();

    /// <summary>A restart forgets the counts: return them now so no vcpu's write window leaks.</summary>
    protected override void PreRestart(Exception reason, object message)
    {
        _cell.Restarts++;
        // An in-kernel APIC keeps its state through the restart; a model saves its own.
        try { _cell.State = _apic.Kind == LapicBackendKind.KvmAssisted ? null : _apic.State(); }
        catch (Exception) { _cell.State = null; } // a model too broken to save restarts from reset
        _cell.Reported = _cell.State is null ? null : _reported;

        _credits.ReturnAll();
        base.PreRestart(reason, message);
    }

    /// <summary>After every message: report a new pending vector, re-arm the timer.</summary>
    private void Changed()
    {
        if (!_cell.Vcpu.IsNobody()) TellVcpu();
        ArmTimer();
    }

    /// <summary>Tells the vcpu a new pending vector (or its withdrawal), the TPR and IA32_APIC_BASE
    /// where they differ from what it was told.</summary>
    private void TellVcpu()
    {
        var pending = _apic.PendingInterrupt();
        if (pending is null)
        {
            // Nothing deliverable (TPR raised, INIT, masked): take back what the vcpu was told, so it
            // does not inject it. (After an acceptance _reported is already null: nothing to take back.)
            if (_reported is not null) _cell.Vcpu.Tell(new NoInterruptPending(_vcpuId, ++_cell.Seq), Self);
            _reported = null;
        }
        else if (pending != _reported)
        {
            _reported = pending;
            _cell.Vcpu.Tell(new InterruptPending(_vcpuId, (byte)pending.Value, ++_cell.Seq), Self);
        }

        if (_apic.TaskPriority is { } tpr && tpr != _vcpuTpr)
        {
            _vcpuTpr = tpr;
            _cell.Vcpu.Tell(new TaskPriorityChanged(_vcpuId, tpr), Self);
        }

        TellApicBase();
    }

    /// <summary>Arms the one timer for the backend's next deadline (or cancels it).</summary>
    private void ArmTimer()
    {
        var deadline = _apic.NextDeadline;
        if (deadline == _armed) return;
        _armed = deadline;
        if (deadline is null)
        {
            Timers.Cancel(TimerKey);
            return;
        }
        var delay = deadline.Value - _clock.Now;
        delay = delay < TimeSpan.Zero ? TimeSpan.Zero : delay > MaxTimerDelay ? MaxTimerDelay : delay;
        Timers.StartSingleTimer(TimerKey, TimerTick.Instance, delay);
    }

    /// <summary>Tells the vcpu IA32_APIC_BASE when it is not the value the vcpu mirrors.</summary>
    private void TellApicBase()
    {
        if (_cell.Vcpu.IsNobody()) return; // told once a vcpu is attached
        if (_apic.ApicBase is not { } apicBase || apicBase == _vcpuApicBase) return;
        _vcpuApicBase = apicBase;
        _cell.Vcpu.Tell(new ApicBaseChanged(_vcpuId, apicBase), Self);
    }

    /// <summary>The model's outputs as messages. Called inside this actor's message handling.</summary>
    private sealed class EventsToActors(int vcpuId, Wiring wiring, VlapicCell cell, IActorRef self) : ILapicEvents
    {
        public void SendIpi(Ipi ipi)
        {
            cell.IpisSent++;
            if (wiring.Peers is { } peers && ApicRouting.TryDeliverDirectly(ipi, peers.Vlapics, self)) return;
            wiring.Router.Tell(ipi, self);
        }

        public void LevelEoi(byte vector) => wiring.EoiTarget.Tell(new VlapicProtocol.LevelEoi(vcpuId, vector), self);

        public void VcpuEvent(VcpuEventKind kind, byte vector)
        {
            IVcpuEvent e = kind switch
            {
                VcpuEventKind.Nmi => new NmiPending(vcpuId),
                VcpuEventKind.Smi => new SmiPending(vcpuId),
                VcpuEventKind.Init => new InitReceived(vcpuId),
                VcpuEventKind.StartUp => new StartupReceived(vcpuId, vector),
                _ => new ExtIntPending(vcpuId),
            };
            cell.Vcpu.Tell(e, self);
        }
    }
}
