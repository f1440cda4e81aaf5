using System.Runtime.CompilerServices;

namespace ActorVmm.LibVmm;

/// <summary>
/// A typed view of the shared <c>struct kvm_run</c> page of one vcpu. Offsets are those of
/// linux/kvm.h on x86-64 (checked in a test against the header). The view is a pointer: it is
/// valid while its <see cref="VcpuHandle"/> lives, and used only on that vcpu's thread except for
/// <see cref="ImmediateExit"/>, which a kicker sets from another thread.
/// </summary>
public readonly unsafe struct KvmRunView
{
    public const int RequestInterruptWindowOffset = 0;
    public const int ImmediateExitOffset = 1;
    public const int ExitReasonOffset = 8;
    public const int ReadyForInterruptInjectionOffset = 12;
    public const int IfFlagOffset = 13;
    public const int FlagsOffset = 14;
    public const int Cr8Offset = 16;
    public const int ApicBaseOffset = 24;
    public const int UnionOffset = 32;

    // io
    public const int IoDirectionOffset = 32;
    public const int IoSizeOffset = 33;
    public const int IoPortOffset = 34;
    public const int IoCountOffset = 36;
    public const int IoDataOffsetOffset = 40;

    // mmio
    public const int MmioPhysAddrOffset = 32;
    public const int MmioDataOffset = 40;
    public const int MmioLenOffset = 48;
    public const int MmioIsWriteOffset = 52;

    // msr
    public const int MsrErrorOffset = 32;
    public const int MsrReasonOffset = 40;
    public const int MsrIndexOffset = 44;
    public const int MsrDataOffset = 48;

    // internal
    public const int InternalSuberrorOffset = 32;
    public const int InternalNdataOffset = 36;
    public const int InternalDataOffset = 40;

    // fail_entry
    public const int FailEntryReasonOffset = 32;
    public const int FailEntryCpuOffset = 40;

    // system_event
    public const int IoapicEoiVectorOffset = 32;

    public const int SystemEventTypeOffset = 32;
    public const int SystemEventNdataOffset = 36;
    public const int SystemEventDataOffset = 40;

    public const int KvmValidRegsOffset = 288;
    public const int SyncRegsOffset = 304;
    public const int Size = 2352;

    private readonly byte* _p;

    internal KvmRunView(byte* p) => _p = p;

    public bool IsNull => _p == null;

    // SAFETY (every access below): _p is the vcpu's mapped kvm_run page, which lives as long as its
    // VcpuHandle (the view's contract), and every offset is a field of struct kvm_run inside its first
    // page; the data spans (IoData, MmioData) are the lengths KVM gave for the current exit.
    private T Get<T>(int offset) where T : unmanaged => Unsafe.ReadUnaligned<T>(_p + offset);
    private void Set<T>(int offset, T value) where T : unmanaged => Unsafe.WriteUnaligned(_p + offset, value);

    public KvmExitReason ExitReason => (KvmExitReason)Get<uint>(ExitReasonOffset);

    public bool RequestInterruptWindow
    {
        get => _p[RequestInterruptWindowOffset] != 0;
        set => _p[RequestInterruptWindowOffset] = value ? (byte)1 : (byte)0;
    }

    /// <summary>Set from any thread by a kicker; cleared by the vcpu thread after KVM_RUN returns EINTR.</summary>
    public bool ImmediateExit
    {
        get => Volatile.Read(ref _p[ImmediateExitOffset]) != 0;
        set => Volatile.Write(ref _p[ImmediateExitOffset], value ? (byte)1 : (byte)0);
    }

    public bool ReadyForInterruptInjection => _p[ReadyForInterruptInjectionOffset] != 0;
    public bool IfFlag => _p[IfFlagOffset] != 0;
    public ulong Cr8 { get => Get<ulong>(Cr8Offset); set => Set(Cr8Offset, value); }
    public ulong ApicBase => Get<ulong>(ApicBaseOffset);

    public bool IoIsOut => _p[IoDirectionOffset] == 1;
    public byte IoSize => _p[IoSizeOffset];
    public ushort IoPort => Get<ushort>(IoPortOffset);
    public uint IoCount => Get<uint>(IoCountOffset);
    public ulong IoDataOffset => Get<ulong>(IoDataOffsetOffset);

    /// <summary>The I/O data buffer inside the kvm_run mapping (count × size bytes).</summary>
    public Span<byte> IoData => new(_p + IoDataOffset, IoSize * (int)IoCount);

    public ulong MmioPhysAddr => Get<ulong>(MmioPhysAddrOffset);
    public uint MmioLen => Get<uint>(MmioLenOffset);
    public bool MmioIsWrite => _p[MmioIsWriteOffset] != 0;
    public Span<byte> MmioData => new(_p + MmioDataOffset, 8);

    public uint MsrReason => Get<uint>(MsrReasonOffset);
    public uint MsrIndex => Get<uint>(MsrIndexOffset);
    public ulong MsrData { get => Get<ulong>(MsrDataOffset); set => Set(MsrDataOffset, value); }
    public byte MsrError { get => _p[MsrErrorOffset]; set => _p[MsrErrorOffset] = value; }

    public uint InternalSuberror => Get<uint>(InternalSuberrorOffset);
    public uint InternalNdata => Get<uint>(InternalNdataOffset);
    public ulong InternalData(int i) => Get<ulong>(InternalDataOffset + 8 * i);

    public ulong FailEntryReason => Get<ulong>(FailEntryReasonOffset);
    public uint FailEntryCpu => Get<uint>(FailEntryCpuOffset);

    public byte IoapicEoiVector => _p[IoapicEoiVectorOffset];

    public uint SystemEventType => Get<uint>(SystemEventTypeOffset);
    public uint SystemEventNdata => Get<uint>(SystemEventNdataOffset);
    public ulong SystemEventData(int i) => Get<ulong>(SystemEventDataOffset + 8 * i);
}
