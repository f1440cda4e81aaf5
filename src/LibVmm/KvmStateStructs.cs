using System.Runtime.InteropServices;

namespace ActorVmm.LibVmm;

// Layouts of asm/kvm.h and linux/kvm.h (x86-64) for the state a snapshot saves. Sizes and offsets
// are checked in tests/LibVmm.Tests (KernelAbi) against the numbers gcc prints from the headers.

/// <summary><c>struct kvm_vcpu_events</c>, 64 bytes (KVM_GET/SET_VCPU_EVENTS): the exception, interrupt
/// and NMI KVM holds between two entries, the interrupt shadow, the SIPI vector, SMM state.</summary>
[StructLayout(LayoutKind.Sequential)]
public unsafe struct KvmVcpuEvents
{
    public byte ExceptionInjected, ExceptionNr, ExceptionHasErrorCode, ExceptionPending;
    public uint ExceptionErrorCode;
    public byte InterruptInjected, InterruptNr, InterruptSoft, InterruptShadow;
    public byte NmiInjected, NmiPending, NmiMasked, NmiPad;
    public uint SipiVector;
    public uint Flags;
    public byte SmiSmm, SmiPending, SmiInsideNmi, SmiLatchedInit;
    public byte TripleFaultPending;
    public fixed byte Reserved[26];
    public byte ExceptionHasPayload;
    public ulong ExceptionPayload;

    /// <summary>KVM_VCPUEVENT_VALID_NMI_PENDING: KVM_SET_VCPU_EVENTS takes <see cref="NmiPending"/>.</summary>
    public const uint ValidNmiPending = 0b0000_0001;
    /// <summary>KVM_VCPUEVENT_VALID_SIPI_VECTOR: KVM_SET_VCPU_EVENTS takes <see cref="SipiVector"/>.</summary>
    public const uint ValidSipiVector = 0b0000_0010;
    /// <summary>KVM_VCPUEVENT_VALID_SHADOW: <see cref="InterruptShadow"/> is meaningful.</summary>
    public const uint ValidShadow = 0b0000_0100;
    /// <summary>KVM_VCPUEVENT_VALID_SMM: the smi fields are meaningful.</summary>
    public const uint ValidSmm = 0b0000_1000;
    /// <summary>KVM_X86_SHADOW_INT_MOV_SS / KVM_X86_SHADOW_INT_STI: the instruction boundary is inside
    /// the one-instruction shadow of a MOV SS or an STI (Intel SDM Vol 3A §6.8.3, §6.8.1).</summary>
    public const byte ShadowMovSs = 0b01, ShadowSti = 0b10;
}

/// <summary><c>struct kvm_debugregs</c>, 128 bytes: DR0-DR3, DR6, DR7 (KVM_GET/SET_DEBUGREGS).</summary>
[StructLayout(LayoutKind.Sequential)]
public unsafe struct KvmDebugRegs
{
    public fixed ulong Db[4];
    public ulong Dr6, Dr7;
    /// <summary>Must be 0 on KVM_SET_DEBUGREGS.</summary>
    public ulong Flags;
    public fixed ulong Reserved[9];
}

/// <summary><c>struct kvm_clock_data</c>, 48 bytes (KVM_GET/SET_CLOCK): the VM's kvmclock in ns and,
/// when <see cref="Flags"/> say so, the host's CLOCK_REALTIME and TSC at the same instant.</summary>
[StructLayout(LayoutKind.Sequential)]
public unsafe struct KvmClockData
{
    public ulong Clock;
    public uint Flags;
    public uint Pad0;
    public ulong Realtime;
    public ulong HostTsc;
    public fixed uint Pad[4];

    /// <summary>KVM_CLOCK_TSC_STABLE: KVM keeps one master clock for every vcpu (KVM_GET_CLOCK only).</summary>
    public const uint TscStable = 1u << 1;
    /// <summary>KVM_CLOCK_REALTIME: <see cref="Realtime"/> is valid; on KVM_SET_CLOCK, KVM advances the
    /// clock by the host realtime elapsed since it (never backwards).</summary>
    public const uint RealtimeValid = 1u << 2;
    /// <summary>KVM_CLOCK_HOST_TSC: <see cref="HostTsc"/> is valid (KVM_GET_CLOCK only).</summary>
    public const uint HostTscValid = 1u << 3;
}

/// <summary><c>struct kvm_device_attr</c>, 24 bytes: one attribute of a device or, on a vcpu fd, of the vcpu.</summary>
[StructLayout(LayoutKind.Sequential)]
public struct KvmDeviceAttr
{
    public uint Flags, Group;
    public ulong Attr, Addr;

    /// <summary>KVM_VCPU_TSC_CTRL / KVM_VCPU_TSC_OFFSET: guest TSC = host TSC (scaled) + this offset.</summary>
    public const uint GroupTscControl = 0;
    public const ulong AttrTscOffset = 0;
}

/// <summary>Sizes of the KVM structs a <see cref="VcpuKvmState"/> keeps as their raw images.</summary>
public static class KvmStateSizes
{
    public const int Regs = 144, Sregs = 312, Fpu = 416, Xsave = 4096, DebugRegs = 128, VcpuEvents = 64;
    public const int Lapic = VcpuHandle.LapicStateSize;
    /// <summary><c>struct kvm_xcrs</c>: nr_xcrs, flags, 16 × { xcr, reserved, value }, 16 × u64 padding.</summary>
    public const int Xcrs = 392, MaxXcrs = 16;
}
