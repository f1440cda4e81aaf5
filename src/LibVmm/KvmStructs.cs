using System.Runtime.InteropServices;

namespace ActorVmm.LibVmm;

// Layouts of linux/kvm.h and asm/kvm.h (x86-64). Sizes and offsets are checked in
// tests/LibVmm.Tests against the numbers the kernel headers give.

/// <summary><c>struct kvm_regs</c>, 144 bytes.</summary>
[StructLayout(LayoutKind.Sequential)]
public struct KvmRegs
{
    public ulong Rax, Rbx, Rcx, Rdx, Rsi, Rdi, Rsp, Rbp;
    public ulong R8, R9, R10, R11, R12, R13, R14, R15;
    public ulong Rip, Rflags;
}

/// <summary><c>struct kvm_segment</c>, 24 bytes.</summary>
[StructLayout(LayoutKind.Sequential)]
public struct KvmSegment
{
    public ulong Base;
    public uint Limit;
    public ushort Selector;
    public byte Type;
    public byte Present, Dpl, Db, S, L, G, Avl;
    public byte Unusable;
    public byte Padding;

    public override readonly string ToString() =>
        $"sel={Selector:X4} base={Base:X16} limit={Limit:X8} type={Type} p={Present} dpl={Dpl} db={Db} s={S} l={L} g={G}";
}

/// <summary><c>struct kvm_dtable</c>, 16 bytes.</summary>
[StructLayout(LayoutKind.Sequential)]
public struct KvmDtable
{
    public ulong Base;
    public ushort Limit;
    public ushort Padding0, Padding1, Padding2;
}

/// <summary><c>struct kvm_sregs</c>, 312 bytes.</summary>
[StructLayout(LayoutKind.Sequential)]
public unsafe struct KvmSregs
{
    public KvmSegment Cs, Ds, Es, Fs, Gs, Ss;
    public KvmSegment Tr, Ldt;
    public KvmDtable Gdt, Idt;
    public ulong Cr0, Cr2, Cr3, Cr4, Cr8;
    public ulong Efer;
    public ulong ApicBase;
    public fixed ulong InterruptBitmap[4];
}

/// <summary><c>struct kvm_fpu</c>, 416 bytes.</summary>
[StructLayout(LayoutKind.Sequential)]
public unsafe struct KvmFpu
{
    public fixed byte Fpr[128];
    public ushort Fcw, Fsw;
    public byte Ftwx, Pad1;
    public ushort LastOpcode;
    public ulong LastIp, LastDp;
    public fixed byte Xmm[256];
    public uint Mxcsr, Pad2;
}

/// <summary><c>struct kvm_userspace_memory_region</c>, 32 bytes.</summary>
[StructLayout(LayoutKind.Sequential)]
public struct KvmUserspaceMemoryRegion
{
    public uint Slot;
    public uint Flags;
    public ulong GuestPhysAddr;
    public ulong MemorySize;
    public ulong UserspaceAddr;

    public const uint LogDirtyPages = 1;
    public const uint ReadOnly = 2;
}

/// <summary><c>struct kvm_dirty_log</c>, 16 bytes: a slot and the user buffer for its bitmap.</summary>
[StructLayout(LayoutKind.Sequential)]
public struct KvmDirtyLog
{
    public uint Slot;
    public uint Padding;
    public ulong DirtyBitmap;
}

/// <summary><c>struct kvm_clear_dirty_log</c>, 24 bytes (KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2).</summary>
[StructLayout(LayoutKind.Sequential)]
public struct KvmClearDirtyLog
{
    public uint Slot;
    public uint NumPages;
    public ulong FirstPage;
    public ulong DirtyBitmap;
}

/// <summary>
/// <c>struct kvm_dirty_gfn</c>, 16 bytes: one entry of a vcpu's dirty ring. <see cref="Slot"/> is
/// as_id &lt;&lt; 16 | slot id, <see cref="Offset"/> the page number inside the slot.
/// </summary>
[StructLayout(LayoutKind.Sequential)]
public struct KvmDirtyGfn
{
    public uint Flags;
    public uint Slot;
    public ulong Offset;

    /// <summary>KVM_DIRTY_GFN_F_DIRTY: KVM pushed the entry; user space has not harvested it.</summary>
    public const uint FlagDirty = 0b01;
    /// <summary>KVM_DIRTY_GFN_F_RESET: harvested; KVM_RESET_DIRTY_RINGS re-protects the page and frees the entry.</summary>
    public const uint FlagReset = 0b10;
}

/// <summary><c>struct kvm_cpuid_entry2</c>, 40 bytes.</summary>
[StructLayout(LayoutKind.Sequential)]
public struct KvmCpuidEntry2
{
    public uint Function, Index, Flags;
    public uint Eax, Ebx, Ecx, Edx;
    public uint Padding0, Padding1, Padding2;

    /// <summary>KVM_CPUID_FLAG_SIGNIFCANT_INDEX: the entry depends on ECX (the subleaf).</summary>
    public const uint SignificantIndex = 1;
}

/// <summary><c>struct kvm_msr_entry</c>, 16 bytes.</summary>
[StructLayout(LayoutKind.Sequential)]
public struct KvmMsrEntry
{
    public uint Index, Reserved;
    public ulong Data;
}

/// <summary><c>struct kvm_enable_cap</c>, 104 bytes.</summary>
[StructLayout(LayoutKind.Sequential)]
public unsafe struct KvmEnableCap
{
    public uint Cap, Flags;
    public fixed ulong Args[4];
    public fixed byte Pad[64];
}
