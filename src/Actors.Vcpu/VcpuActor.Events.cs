using Akka.Actor;
using Akka.Event;
using ActorVmm.Devices.Tracing;
using ActorVmm.Lapic;
using ActorVmm.LibVmm;
using static ActorVmm.Vcpu.VcpuProtocol;

namespace ActorVmm.Vcpu;

/// <summary>
/// The vlapic's events (the seed's vcpu_notify_event: <see cref="VlapicProtocol.IVcpuEvent"/>, each
/// one kicks the vcpu out of the guest): interrupts and NMIs to inject, which wake a halted vcpu;
/// the TPR and IA32_APIC_BASE the vcpu mirrors; INIT and SIPI. Each returns the state the vcpu goes
/// on in; <see cref="MoveTo"/> moves there.
/// </summary>
internal sealed partial class VcpuActor
{
    private State OnVlapicEvent(VlapicProtocol.IVcpuEvent e)
    {
        switch (e)
        {
            case VlapicProtocol.InterruptPending p:
                return _interrupts.LapicPending(p.Vector, p.Seq, _trace is null ? 0 : TraceContext.Save().Current) ? Wake() : _state;
            case VlapicProtocol.NoInterruptPending n:
                _interrupts.LapicWithdrawn(n.Seq); // not injected yet: the guest does not get it
                return _state;
            case VlapicProtocol.TaskPriorityChanged t:
                _interrupts.Cr8 = (byte)(t.Tpr >> 4);
                _vcpu.Cr8 = _interrupts.Cr8; // KVM loads it into CR8 at the next entry
                return _state;
            case VlapicProtocol.ApicBaseChanged b:
                OnApicBaseChanged(b.ApicBase);
                return _state;
            case VlapicProtocol.NmiPending:
                _interrupts.Nmi();
                return Wake();
            case VlapicProtocol.ExtIntPending when _wiring.Pic is not null: // without an 8259 nobody gives the vector
                _interrupts.ExtInt();
                return Wake();
            case VlapicProtocol.InitReceived:
                return OnInit();
            case VlapicProtocol.StartupReceived s:
                return OnStartup(s.Vector);
            default:
                return _state; // SMI: no SMM in this VMM
        }
    }

    /// <summary>
    /// IA32_APIC_BASE changed in the vlapic: the xAPIC page moves where the base names it, or is
    /// decoded nowhere outside xAPIC mode (SDM Vol 3A §10.4.4-10.4.5); and KVM is told the value
    /// (KVM_SET_MSRS, host-initiated: KVM never sees the guest's WRMSR, which exits to the vlapic),
    /// so that the CPUID.01H:EDX.APIC bit it reports follows IA32_APIC_BASE.EN (§10.4.3).
    /// </summary>
    private void OnApicBaseChanged(ulong apicBase)
    {
        if (_wiring.ApicPage is { } page)
            _apicPage = LocalApic.XApicPage(apicBase) is { } at ? new ApicPage(at, page) : null;
        try
        {
            _vcpu.SetMsrs(new KvmMsrEntry { Index = ApicMsrs.ApicBase, Data = apicBase });
        }
        catch (Exception e) when (e is KvmException or NotSupportedException)
        {
            Context.GetLogger().Warning("vcpu {0}: KVM did not take IA32_APIC_BASE 0x{1:X} ({2}); CPUID.01H:EDX.APIC may not follow it",
                Id, apicBase, e.Message);
        }
    }

    /// <summary>An event that makes a halted vcpu run (a spurious wake-up from HLT is allowed).</summary>
    private State Wake()
    {
        if (_state == State.Running) _wakePending = true;
        if (_state == State.Paused && _resumeTo == State.Halted) _resumeTo = State.Running;
        return _state == State.Halted ? State.Running : _state; // Halted --interrupt/NMI--> Running
    }

    /// <summary>
    /// INIT (SDM Vol 3A §8.4, Table 9-1): registers to the INIT state, pending interrupts dropped
    /// (the vlapic has reset itself). An AP then waits for a SIPI; the BSP runs on from the reset
    /// vector (KVM does the same: it has no firmware to return to either).
    /// </summary>
    private State OnInit()
    {
        _interrupts.Init();
        _wakePending = false;
        try
        {
            ProcessorInit.ApplyInit(_vcpu);
        }
        catch (KvmException e)
        {
            return StopWith(StopReason.RunFailed, $"vcpu {Id} stopped: could not apply INIT: {e.Message}");
        }
        if (_state == State.Paused)
        {
            if (Id != 0) _resumeTo = State.WaitingForSipi;
            else if (_resumeTo == State.Halted) _resumeTo = State.Running;
            return _state;
        }
        if (Id != 0) return State.WaitingForSipi; // Created|Running|Halted --INIT (an AP)--> WaitingForSipi
        return _state == State.Halted ? State.Running : _state; // Halted --INIT (the BSP)--> Running at F000:FFF0
    }

    /// <summary>SIPI: only an AP waiting for it starts, at CS = vector &lt;&lt; 8 (base vector &lt;&lt; 12), IP = 0, real mode.</summary>
    private State OnStartup(byte vector)
    {
        var paused = _state == State.Paused;
        if ((paused ? _resumeTo : _state) != State.WaitingForSipi) return _state; // SDM §8.4.4.1: a SIPI outside wait-for-SIPI is ignored
        try
        {
            ProcessorInit.ApplyStartup(_vcpu, vector);
        }
        catch (KvmException e)
        {
            return StopWith(StopReason.RunFailed, $"vcpu {Id} stopped: could not start at SIPI vector 0x{vector:X2}: {e.Message}");
        }
        _wiring.Vm.Tell(new StartedBySipi(Id, vector));
        if (paused)
        {
            _resumeTo = State.Running;
            return _state;
        }
        _vcpu.BindToCurrentThread();
        return State.Running; // WaitingForSipi --SIPI--> Running
    }
}
