using ActorVmm.LibVmm;

namespace ActorVmm.Vcpu;

/// <summary>General-purpose registers, RIP and RFLAGS: the message form of <c>kvm_regs</c>.</summary>
public sealed record RegisterState(
    ulong Rax, ulong Rbx, ulong Rcx, ulong Rdx, ulong Rsi, ulong Rdi, ulong Rsp, ulong Rbp,
    ulong R8, ulong R9, ulong R10, ulong R11, ulong R12, ulong R13, ulong R14, ulong R15,
    ulong Rip, ulong Rflags)
{
    /// <summary>RFLAGS bit 1 is always set.</summary>
    public static readonly RegisterState Reset = new(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xFFF0, 0x2);

    public static RegisterState From(in KvmRegs r) => new(r.Rax, r.Rbx, r.Rcx, r.Rdx, r.Rsi, r.Rdi, r.Rsp, r.Rbp,
        r.R8, r.R9, r.R10, r.R11, r.R12, r.R13, r.R14, r.R15, r.Rip, r.Rflags);

    public KvmRegs ToKvm() => new()
    {
        Rax = Rax, Rbx = Rbx, Rcx = Rcx, Rdx = Rdx, Rsi = Rsi, Rdi = Rdi, Rsp = Rsp, Rbp = Rbp,
        R8 = R8, R9 = R9, R10 = R10, R11 = R11, R12 = R12, R13 = R13, R14 = R14, R15 = R15,
        Rip = Rip, Rflags = Rflags,
    };
}

/// <summary>A segment register with its hidden part: the message form of <c>kvm_segment</c>.</summary>
public sealed record SegmentState(ushort Selector, ulong Base, uint Limit, byte Type, bool Present, byte Dpl,
    bool DefaultBig, bool System, bool Long, bool Granularity, bool Unusable)
{
    public static SegmentState From(in KvmSegment s) => new(s.Selector, s.Base, s.Limit, s.Type, s.Present != 0, s.Dpl,
        s.Db != 0, s.S != 0, s.L != 0, s.G != 0, s.Unusable != 0);

    public KvmSegment ToKvm() => new()
    {
        Selector = Selector, Base = Base, Limit = Limit, Type = Type, Present = B(Present), Dpl = Dpl,
        Db = B(DefaultBig), S = B(System), L = B(Long), G = B(Granularity), Unusable = B(Unusable),
    };

    private static byte B(bool v) => v ? (byte)1 : (byte)0;

    /// <summary>A real-mode data/code segment: base = selector × 16, 64 KiB limit.</summary>
    public static SegmentState RealMode(ushort selector, bool code) =>
        new(selector, (ulong)selector << 4, 0xFFFF, code ? (byte)0xB : (byte)0x3, true, 0, false, true, false, false, false);

    /// <summary>A flat 4 GiB protected-mode segment (code: execute/read; data: read/write).</summary>
    public static SegmentState Flat32(ushort selector, bool code) =>
        new(selector, 0, 0xFFFF_FFFF, code ? (byte)0xB : (byte)0x3, true, 0, true, true, false, true, false);

    /// <summary>A 64-bit code segment (L=1) or a flat data segment for long mode.</summary>
    public static SegmentState Long64(ushort selector, bool code) =>
        new(selector, 0, 0xFFFF_FFFF, code ? (byte)0xB : (byte)0x3, true, 0, !code, true, code, true, false);
}

/// <summary>Descriptor table register (GDTR/IDTR).</summary>
public sealed record TableState(ulong Base, ushort Limit);

/// <summary>Segments, control registers, EFER and APIC base: the message form of <c>kvm_sregs</c>.</summary>
public sealed record SpecialRegisterState(
    SegmentState Cs, SegmentState Ds, SegmentState Es, SegmentState Fs, SegmentState Gs, SegmentState Ss,
    SegmentState Tr, SegmentState Ldt, TableState Gdt, TableState Idt,
    ulong Cr0, ulong Cr2, ulong Cr3, ulong Cr4, ulong Cr8, ulong Efer, ulong ApicBase)
{
    public const ulong Cr0Pe = 1UL << 0;
    public const ulong Cr0Et = 1UL << 4;
    public const ulong Cr0Ne = 1UL << 5;
    public const ulong Cr0Pg = 1UL << 31;
    public const ulong Cr4Pae = 1UL << 5;
    public const ulong EferLme = 1UL << 8;
    public const ulong EferLma = 1UL << 10;

    public static SpecialRegisterState From(in KvmSregs s) => new(
        SegmentState.From(s.Cs), SegmentState.From(s.Ds), SegmentState.From(s.Es), SegmentState.From(s.Fs),
        SegmentState.From(s.Gs), SegmentState.From(s.Ss), SegmentState.From(s.Tr), SegmentState.From(s.Ldt),
        new TableState(s.Gdt.Base, s.Gdt.Limit), new TableState(s.Idt.Base, s.Idt.Limit),
        s.Cr0, s.Cr2, s.Cr3, s.Cr4, s.Cr8, s.Efer, s.ApicBase);

    /// <summary>Applies this state over <paramref name="current"/> (keeps its interrupt bitmap).</summary>
    public KvmSregs ApplyTo(KvmSregs current)
    {
        current.Cs = Cs.ToKvm(); current.Ds = Ds.ToKvm(); current.Es = Es.ToKvm(); current.Fs = Fs.ToKvm();
        current.Gs = Gs.ToKvm(); current.Ss = Ss.ToKvm(); current.Tr = Tr.ToKvm(); current.Ldt = Ldt.ToKvm();
        current.Gdt = new KvmDtable { Base = Gdt.Base, Limit = Gdt.Limit };
        current.Idt = new KvmDtable { Base = Idt.Base, Limit = Idt.Limit };
        current.Cr0 = Cr0; current.Cr2 = Cr2; current.Cr3 = Cr3; current.Cr4 = Cr4; current.Cr8 = Cr8;
        current.Efer = Efer; current.ApicBase = ApicBase;
        return current;
    }

    public bool ProtectedMode => (Cr0 & Cr0Pe) != 0;
    public bool LongMode => (Efer & EferLma) != 0 && Cs.Long;

    /// <summary>Code size of the current CS: 16, 32 or 64 bits (for disassembly).</summary>
    public int CodeBitness => LongMode ? 64 : ProtectedMode && Cs.DefaultBig ? 32 : 16;
}

/// <summary>
/// What INIT and a start-up IPI do to a vcpu's registers when user space holds its MP state (no
/// in-kernel irqchip): the vcpu actor's INIT and SIPI, and any other loop that runs vcpus with the
/// <c>LocalApic</c> model. Both throw <see cref="KvmException"/> when KVM refuses the registers.
/// </summary>
public static class ProcessorInit
{
    /// <summary>The processor state after INIT (SDM Vol 3A Table 9-1): real mode at F000:FFF0, caches
    /// disabled (CR0 = 0x60000010), paging and long mode off; IA32_APIC_BASE is the local APIC's business.</summary>
    public static void ApplyInit(IVcpu vcpu)
    {
        var sregs = vcpu.GetSpecialRegisters();
        var data = SegmentState.RealMode(0, code: false).ToKvm();
        sregs.Cs = new SegmentState(0xF000, 0xFFFF_0000, 0xFFFF, 0xB, true, 0, false, true, false, false, false).ToKvm();
        sregs.Ds = data; sregs.Es = data; sregs.Fs = data; sregs.Gs = data; sregs.Ss = data;
        sregs.Tr = new SegmentState(0, 0, 0xFFFF, 0xB, true, 0, false, false, false, false, false).ToKvm();
        sregs.Ldt = new SegmentState(0, 0, 0xFFFF, 0x2, true, 0, false, false, false, false, false).ToKvm();
        sregs.Gdt = new KvmDtable { Base = 0, Limit = 0xFFFF };
        sregs.Idt = new KvmDtable { Base = 0, Limit = 0xFFFF };
        sregs.Cr0 = 0x6000_0010;
        sregs.Cr2 = 0; sregs.Cr3 = 0; sregs.Cr4 = 0; sregs.Cr8 = 0; sregs.Efer = 0;
        vcpu.SetSpecialRegisters(sregs);
        vcpu.SetRegisters(RegisterState.Reset.ToKvm());
    }

    /// <summary>SIPI (SDM Vol 3A §8.4.4.1): real mode at CS = vector &lt;&lt; 8 (base vector &lt;&lt; 12), IP = 0.</summary>
    public static void ApplyStartup(IVcpu vcpu, byte vector)
    {
        var sregs = vcpu.GetSpecialRegisters();
        sregs.Cs = new SegmentState((ushort)(vector << 8), (ulong)vector << 12, 0xFFFF, 0xB, true, 0,
            false, true, false, false, false).ToKvm();
        vcpu.SetSpecialRegisters(sregs);
        var regs = vcpu.GetRegisters();
        regs.Rip = 0;
        regs.Rflags = 0x2;
        vcpu.SetRegisters(regs);
    }
}
