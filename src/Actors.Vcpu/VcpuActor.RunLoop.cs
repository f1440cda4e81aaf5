using Akka.Actor;
using ActorVmm.Devices.Tracing;
using ActorVmm.Lapic;
using ActorVmm.LibVmm;
using static ActorVmm.Vcpu.VcpuProtocol;

namespace ActorVmm.Vcpu;

/// <summary>
/// The vcpu's run loop (<see cref="State.Running"/>): plan the entry's interrupts, one KVM_RUN,
/// and what the exit leads to. Every method returns the state the vcpu goes on in; the state
/// machine (<see cref="MoveTo"/>) moves there.
/// </summary>
internal sealed partial class VcpuActor
{
    /// <summary>
    /// Runs the guest until an exit leads to another state, or a message is waiting. While the
    /// mailbox is empty the vcpu re-enters at once instead of telling itself Run: a message that
    /// needs the vcpu kicks it, so it is seen before the next entry either way.
    /// </summary>
    private State Step()
    {
        for (var i = 0; i < MaxExitsPerTurn; i++)
        {
            var next = RunOnce();
            if (next != State.Running) return next;
            if (_queue.HasMessages) break;
        }
        Self.Tell(Run.Instance);
        return State.Running;
    }

    /// <summary>One KVM_RUN and its exit; the state it leads to (Running: simply run again).</summary>
    private bool _entered;

    private State RunOnce()
    {
        var plan = _interrupts.PlanEntry(_vcpu.ReadyForInterruptInjection);
        for (var i = 0; i < plan.Nmis; i++)
        {
            try { _vcpu.InjectNmi(); }
            catch (KvmException) { /* an NMI KVM refuses is lost, as one arriving while another is latched */ }
        }
        if (plan.AskPic)
        {
            _devices.Inta(_wiring.Pic!); // INTA: the vector comes from the 8259
            return AwaitReply();
        }
        if (plan.Vector is { } vector)
        {
            _vcpu.InjectInterrupt(vector);
            if (plan.FromLapic) AcceptLapicVector(vector);
        }
        _vcpu.RequestInterruptWindow = plan.RequestWindow;
        // From the announcement on, a kick signals this thread; before it, a kick only sets
        // immediate_exit, so look for messages after it. This also catches an actor that runs on
        // this thread (the vlapic, on InterruptAccepted) and answered already: a kick from this
        // thread is no kick. What was injected stays queued in KVM for the next entry.
        _vcpu.PrepareToRun();
        if (_queue.HasMessages)
        {
            _vcpu.CancelRun();
            return State.Running;
        }
        VmExit exit;
        if (!_entered)
        {
            // Once per vcpu: when it first entered the guest (start-up and restore latency).
            _entered = true;
            _wiring.OnFirstEntry?.Invoke(Id, System.Diagnostics.Stopwatch.GetTimestamp());
        }
        try
        {
            _stats.Entering();
            exit = _vcpu.Run();
            _stats.Exited(exit);
            _interrupts.Exited();
        }
        catch (Exception e)
        {
            return StopWith(StopReason.RunFailed, $"vcpu {Id} stopped: KVM_RUN failed: {e.Message}");
        }
        if (_emulatedLapic) SyncCr8();
        if (_trace is not null) TraceExit(exit);
        if (_kernelLapic is { Started: false } kernel && kernel.NoteStart() is { } sipi) _wiring.Vm.Tell(new StartedBySipi(Id, sipi));
        return Handle(exit);
    }

    /// <summary>Carries out what <see cref="ExitHandler.Decide"/> makes of <paramref name="exit"/>.</summary>
    private State Handle(VmExit exit)
    {
        var action = ExitHandler.Decide(exit, _wiring.Ports, _mmio, _emulatedLapic, _apicPage);
        switch (action.Kind)
        {
            case ExitActionKind.Reenter:
                if (exit is VmExit.Intr) _stats.IntrExits++;
                return State.Running;
            case ExitActionKind.PostWrite:
                return _devices.Post(exit, action) ? State.Running : State.WaitingForCredit; // Running --window full--> WaitingForCredit
            case ExitActionKind.WriteAndWait:
                _devices.WriteAndWait(exit, action);
                return AwaitReply();
            case ExitActionKind.Read:
                _devices.Read(exit, action);
                return AwaitReply();
            case ExitActionKind.ApicMsr:
                _devices.ApicMsr(exit, _wiring.Vlapic!); // synchronous like a device read: a refused access is a #GP
                return AwaitReply();
            case ExitActionKind.UnassignedRead:
                _devices.CompleteUnassignedRead(exit, action.Size);
                return State.Running;
            case ExitActionKind.UnassignedWrite:
                _stats.Access(exit);
                _stats.UnassignedWrites++;
                return State.Running;
            case ExitActionKind.Halt:
                _stats.HltExits++;
                return OnHalt();
            case ExitActionKind.IoapicEoi:
                // KVM's APIC retired a level-triggered vector: the IOAPIC clears Remote IRR.
                _wiring.Vlapic?.Tell(new VlapicProtocol.EndOfInterrupt(((VmExit.IoapicEoi)exit).Vector), Self);
                return State.Running;
            case ExitActionKind.HarvestDirtyRing:
                // KVM runs the vcpu again only once its full ring is harvested and reset.
                var next = TryHarvestDirtyRing(out var harvest);
                if (next == State.Running)
                    _wiring.Vmspace?.Tell(new Memory.VmspaceProtocol.DirtyRingHarvested(Id, harvest.Gfns, harvest.RingWasFull), Self);
                return next;
            case ExitActionKind.MsrFault:
                if (exit is VmExit.MsrRead) _vcpu.CompleteMsrRead(0, fault: true);
                else _vcpu.CompleteMsrWrite(fault: true);
                return State.Running;
            default:
                return StopWith(action.StopReason, FailureReport.Build(Id, action.StopReason, exit, _vcpu, _wiring.Memory));
        }
    }

    /// <summary>
    /// Devices, vlapics and the 8259 run on the thread that sends to them when they are idle
    /// (InlineDispatcher, as bhyve handles a vcpu's port, MMIO and APIC accesses in the vcpu's
    /// context), so the reply is usually in the mailbox before Tell returns. Taken at once while
    /// first in line (the next element of a string IN is asked for and taken the same way), it
    /// spares the vcpu a turn of its mailbox: the guest goes on in this same Step. With anything
    /// else first in line, or no reply yet (the device was busy on another thread), the vcpu spins
    /// for it briefly (a device answers within microseconds, and a sleeping thread costs more to
    /// wake than the read) and then waits in <see cref="State.WaitingForReply"/>. Only this thread
    /// takes from the mailbox, so the message peeked at is still first once taken in.
    /// </summary>
    private State AwaitReply()
    {
        while (_queue.TryPeek(out var first))
        {
            var taken = _devices.Take(first, _interrupts);
            if (taken == ReplyProgress.None) break;
            _queue.TryDequeue(out _);
            if (taken == ReplyProgress.Complete) return State.Running;
            if (taken == ReplyProgress.MachineEnding) return State.Ending; // Running --a write that ended the machine--> Ending
        }
        MailboxSpin.Until(_queue, System.Diagnostics.Stopwatch.GetTimestamp() + ReplySpinTicks);
        return State.WaitingForReply; // Running --a reply to wait for--> WaitingForReply
    }

    /// <summary>HLT: Running on when something is pending, else Halted.</summary>
    private State OnHalt()
    {
        if (_interrupts.AnyPending || _wakePending)
        {
            _wakePending = false;
            return State.Running;
        }
        // With IF=0 and nothing pending, only an NMI or INIT could wake the vcpu: the VM decides
        // whether that ends its run. A halt with IF=1 is none of the VM's business (an idle guest
        // waiting for its next interrupt): no message for it, which on a busy guest would wake a
        // pool thread on every HLT.
        var reported = !_vcpu.InterruptsEnabled;
        _halt.Halted(System.Diagnostics.Stopwatch.GetTimestamp(), reported);
        if (reported) _wiring.Vm.Tell(new VcpuHalted(Id));
        _halt.Poll(_queue);
        return State.Halted; // Running --HLT--> Halted
    }

    /// <summary>Tells the vlapic the vector went in (vlapic_intr_accepted); in a trace, as caused by
    /// the report that made it pending, not by whatever the vcpu handled last.</summary>
    private void AcceptLapicVector(byte vector)
    {
        if (_trace is null)
        {
            _wiring.Vlapic?.Tell(VlapicProtocol.InterruptAccepted.Of(vector), Self);
            return;
        }
        var saved = TraceContext.Save();
        TraceContext.Enter(Self, _interrupts.LapicCause);
        _wiring.Vlapic?.Tell(VlapicProtocol.InterruptAccepted.Of(vector), Self);
        TraceContext.Restore(saved);
    }

    /// <summary>The guest may have written CR8 without an exit (raising it never exits; lowering it
    /// exits as KVM_EXIT_SET_TPR on most hosts): its TPR goes to the vlapic, which arbitrates with it.</summary>
    private void SyncCr8()
    {
        var cr8 = (byte)(_vcpu.Cr8 & 0xF);
        if (cr8 == _interrupts.Cr8) return;
        _interrupts.Cr8 = cr8;
        _wiring.Vlapic!.Tell(new VlapicProtocol.SetTaskPriority((byte)(cr8 << 4)), Self);
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
        TraceContext.Enter(Self, TraceContext.Record(_trace!, Self, Self, e));
    }

    /// <summary>Harvests this vcpu's dirty ring (empty without one). A failed harvest stops the vcpu:
    /// its ring can no longer be trusted, and a full ring would keep it out of the guest.</summary>
    private State TryHarvestDirtyRing(out DirtyRingHarvest harvest)
    {
        try
        {
            harvest = _vcpu.HarvestDirtyRing();
            return _state;
        }
        catch (KvmException e)
        {
            harvest = DirtyRingHarvest.Empty;
            return StopWith(StopReason.RunFailed, $"vcpu {Id} stopped: harvesting its dirty ring failed: {e.Message}");
        }
    }

    // ---- KVM's local APIC (lapic = assisted) ----

    private void ProbeKernelHalt()
    {
        if (_kernelLapic?.Probe() is not { } news) return;
        if (news.StartedAt is { } sipi) _wiring.Vm.Tell(new StartedBySipi(Id, sipi));
        if (news.Woken) _wiring.Vm.Tell(new VcpuWoken(Id));
        if (news.Halted) _wiring.Vm.Tell(new VcpuHalted(Id));
    }
}
