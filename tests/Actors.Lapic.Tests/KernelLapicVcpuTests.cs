using ActorVmm.LibVmm;

namespace ActorVmm.Lapic.Tests;

/// <summary><see cref="KernelLapicVcpu"/> over a vcpu whose KVM MP state the test sets.</summary>
public sealed class KernelLapicVcpuTests
{
    private sealed class MpVcpu(int id) : IVcpu
    {
        public KvmMpState Mp = KvmMpState.Uninitialized;
        public ulong Rflags = 0x2;
        public ushort CsSelector;
        public int Id => id;
        public KvmMpState GetMpState() => Mp;
        public void SetMpState(KvmMpState state) => Mp = state;
        public byte[] GetLapic() => new byte[1024];
        public KvmRegs GetRegisters() => new() { Rflags = Rflags };
        public KvmSregs GetSpecialRegisters() => new() { Cs = new KvmSegment { Selector = CsSelector } };
        public VmExit Run() => throw new NotSupportedException();
        public void CompleteIoIn(int index, ulong value) { }
        public void CompleteMmioRead(ulong value) { }
        public void CompleteMsrRead(ulong value, bool fault) { }
        public void CompleteMsrWrite(bool fault) { }
        public void SetRegisters(in KvmRegs regs) { }
        public void SetSpecialRegisters(in KvmSregs sregs) { }
        public bool InterruptsEnabled => (Rflags & 0x200) != 0;
        public bool ReadyForInterruptInjection => false;
        public bool RequestInterruptWindow { set { } }
        public void InjectInterrupt(byte vector) { }
        public void InjectNmi() { }
        public bool TryTranslate(ulong linearAddress, out GuestPhysAddr physical) => throw new NotSupportedException();
        public void BindToCurrentThread() { }
        public void Kick() { }
        public void Dispose() { }
    }

    [Fact]
    public void An_ap_is_found_started_once_at_the_sipi_vector_read_back_from_cs()
    {
        var vcpu = new MpVcpu(1);
        var kernel = new KernelLapicVcpu(vcpu);

        Assert.Null(kernel.NoteStart()); // still in wait-for-SIPI
        vcpu.Mp = KvmMpState.InitReceived;
        Assert.Null(kernel.NoteStart());
        vcpu.Mp = KvmMpState.Runnable;
        vcpu.CsSelector = 0x9A00; // SIPI vector 0x9A: CS = vector << 8
        Assert.Equal((byte?)0x9A, kernel.NoteStart());
        Assert.True(kernel.Started);
        Assert.Null(kernel.NoteStart());
        Assert.Null(kernel.Probe().StartedAt);
    }

    [Fact]
    public void The_bsp_is_started_from_reset()
    {
        var kernel = new KernelLapicVcpu(new MpVcpu(0) { Mp = KvmMpState.Runnable, CsSelector = 0xF000 });

        Assert.True(kernel.Started);
        Assert.Null(kernel.NoteStart());
    }

    [Fact]
    public void A_halt_with_interrupts_disabled_is_reported_once_and_its_end_once()
    {
        var vcpu = new MpVcpu(0) { Mp = KvmMpState.Halted, Rflags = 0x2 };
        var kernel = new KernelLapicVcpu(vcpu);

        Assert.Equal(new KernelLapicNews(null, Halted: true, Woken: false), kernel.Probe());
        Assert.Equal(default, kernel.Probe());
        vcpu.Mp = KvmMpState.Runnable; // an NMI woke it
        Assert.Equal(new KernelLapicNews(null, Halted: false, Woken: true), kernel.Probe());
        Assert.Equal(default, kernel.Probe());
    }

    [Fact]
    public void A_halt_with_interrupts_enabled_is_an_idle_guest_and_never_reported()
    {
        var vcpu = new MpVcpu(0) { Mp = KvmMpState.Halted, Rflags = 0x202 };
        var kernel = new KernelLapicVcpu(vcpu);

        Assert.Equal(default, kernel.Probe());
        vcpu.Mp = KvmMpState.Runnable;
        Assert.Equal(default, kernel.Probe());
    }
}
