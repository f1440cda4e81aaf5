using ActorVmm.LibVmm;

namespace ActorVmm.Lapic;

/// <summary>What a look at a vcpu with KVM's local APIC found (<see cref="KernelLapicVcpu.Probe"/>).</summary>
/// <param name="StartedAt">the AP left wait-for-SIPI since the last look, started at this SIPI vector</param>
/// <param name="Halted">the vcpu sleeps in HLT with IF=0 (reported once per halt)</param>
/// <param name="Woken">the vcpu reported <paramref name="Halted"/> before runs again</param>
public readonly record struct KernelLapicNews(byte? StartedAt, bool Halted, bool Woken);

/// <summary>
/// The vcpu's side of KVM's local APIC (<c>lapic = assisted</c>, split irqchip; see
/// <see cref="KvmAssistedLapicBackend"/> for the vlapic's side). KVM keeps the MP state: an AP's
/// KVM_RUN sleeps in the kernel until its SIPI, and HLT never exits, so a vcpu finds these out by
/// looking (KVM api.rst, KVM_GET_MP_STATE): at every exit for an AP not started yet
/// (<see cref="NoteStart"/>), and every <see cref="ProbeInterval"/> for a halt that may end the VM
/// (<see cref="Probe"/>). Without Akka; owned by the vcpu's thread.
/// </summary>
public sealed class KernelLapicVcpu(IVcpu vcpu)
{
    /// <summary>How often a vcpu with KVM's APIC looks for a halt that ends the VM.</summary>
    public static readonly TimeSpan ProbeInterval = TimeSpan.FromMilliseconds(100);

    private const ulong RflagsIf = 1UL << 9;
    private const int Isr = ApicOffsets.Isr, Tmr = ApicOffsets.Tmr, Irr = ApicOffsets.Irr;

    private bool _started = vcpu.Id == 0;
    private bool _haltReported;
    private bool _eoiFlushed;

    /// <summary>The AP is out of wait-for-SIPI (the BSP always is).</summary>
    public bool Started => _started;

    /// <summary>
    /// An AP KVM started at its SIPI is found out of wait-for-SIPI at its first exit or probe: the
    /// SIPI vector, read back from CS (selector = vector &lt;&lt; 8, SDM Vol 3A §8.4.4.1), once. Null
    /// while it still waits, or when the MP state cannot be read now (asked again at the next exit).
    /// </summary>
    public byte? NoteStart(KvmMpState? known = null)
    {
        if (_started) return null;
        try
        {
            var mp = known ?? vcpu.GetMpState();
            if (mp is KvmMpState.Uninitialized or KvmMpState.InitReceived) return null;
            _started = true;
            return (byte)(vcpu.GetSpecialRegisters().Cs.Selector >> 8);
        }
        catch (KvmException)
        {
            return null;
        }
    }

    /// <summary>A restored vcpu: KVM's MP state as restored says whether the AP is out of
    /// wait-for-SIPI already (its start was reported before the snapshot); null leaves it as it is.</summary>
    public void Restored(KvmMpState? mp)
    {
        if (mp is { } state) _started = state is not (KvmMpState.Uninitialized or KvmMpState.InitReceived);
        _haltReported = false;
        _eoiFlushed = false;
    }

    /// <summary>
    /// Reads KVM's MP state between two runs: a halt with IF=0 is reported once per halt (as a HLT
    /// exit with IF=0 is with an emulated APIC), and its end once. The vcpu keeps running either way:
    /// an NMI or INIT from the kernel APIC can still wake it.
    /// </summary>
    public KernelLapicNews Probe()
    {
        try
        {
            var mp = vcpu.GetMpState();
            var started = NoteStart(mp);
            if (mp != KvmMpState.Halted)
            {
                var woken = _haltReported;
                _haltReported = false;
                _eoiFlushed = false;
                return new KernelLapicNews(started, false, woken);
            }
            var interruptsEnabled = (vcpu.GetRegisters().Rflags & RflagsIf) != 0;
            if (interruptsEnabled && !_eoiFlushed && Kvm.IsPvm) FlushLostEoi();
            if (_haltReported || interruptsEnabled) return new KernelLapicNews(started, false, false);
            _haltReported = true;
            return new KernelLapicNews(started, true, false);
        }
        catch (KvmException)
        {
            return default;
        }
    }

    /// <summary>
    /// kvm_pvm (<see cref="Kvm.IsPvm"/>) can keep a level EOI's exit owed while the vcpu sleeps in
    /// HLT, leaving the IOAPIC's Remote IRR set and the line dead. When the kernel APIC shows a level
    /// vector retired (TMR set, neither requested nor in service) during a halt, the vcpu is made
    /// runnable once: its next entry delivers the owed exit, and the guest's HLT returns early (a
    /// wake-up any idle loop tolerates). At most once per halt.
    /// </summary>
    private void FlushLostEoi()
    {
        _eoiFlushed = true;
        var page = vcpu.GetLapic();
        for (var word = 0; word < 8; word++)
        {
            var retired = BitConverter.ToUInt32(page, Tmr + word * 0x10) &
                          ~BitConverter.ToUInt32(page, Isr + word * 0x10) & ~BitConverter.ToUInt32(page, Irr + word * 0x10);
            if (retired == 0) continue;
            vcpu.SetMpState(KvmMpState.Runnable);
            return;
        }
    }

    /// <summary>KVM's local APIC as a <see cref="LapicState"/> (KVM_GET_LAPIC, IA32_APIC_BASE from the
    /// special registers, IA32_TSC_DEADLINE). Throws <see cref="KvmException"/> or
    /// <see cref="NotSupportedException"/> (no KVM APIC).</summary>
    public static LapicState ReadState(IVcpu vcpu)
    {
        var registers = vcpu.GetLapic();
        var apicBase = vcpu.GetSpecialRegisters().ApicBase;
        var deadline = vcpu.GetMsrs(ApicMsrs.TscDeadline) is [var entry] ? entry.Data : 0;
        return KvmAssistedLapicBackend.StateFromKernel(registers, apicBase, deadline);
    }

    /// <summary>Loads <paramref name="state"/> into KVM's local APIC (KVM_SET_LAPIC). Throws as <see cref="ReadState"/>.</summary>
    public static void WriteState(IVcpu vcpu, LapicState state) =>
        vcpu.SetLapic(KvmAssistedLapicBackend.KernelImage(state, VcpuHandle.LapicStateSize));
}
