using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;

namespace ActorVmm.LibVmm.Tests;

/// <summary><see cref="VmExit.Decode"/> on a fake kvm_run page filled at the kernel's offsets.</summary>
public sealed unsafe class VmExitDecodeTests : IDisposable
{
    // kvm_run, then the port I/O page KVM puts at KVM_PIO_PAGE_OFFSET (data_offset points there).
    private const int PageBytes = 2 * 4096;
    private readonly byte* _page = (byte*)System.Runtime.InteropServices.NativeMemory.AllocZeroed(PageBytes);

    public void Dispose() => System.Runtime.InteropServices.NativeMemory.Free(_page);

    private void Set<T>(int offset, T value) where T : unmanaged
    {
        Assert.InRange(offset, 0, PageBytes - sizeof(T));
        Unsafe.WriteUnaligned(_page + offset, value);
    }

    private VmExit Decode() => VmExit.Decode(new KvmRunView(_page));

    private void Io(byte direction, byte size, ushort port, uint count, ReadOnlySpan<byte> data)
    {
        Set(KernelAbi.ExitReason, KernelAbi.ExitIo);
        Set(KernelAbi.IoDirection, direction);
        Set(KernelAbi.IoSize, size);
        Set(KernelAbi.IoPort, port);
        Set(KernelAbi.IoCount, count);
        Set(KernelAbi.IoDataOffset, KernelAbi.PioPageOffset);
        data.CopyTo(new Span<byte>(_page + KernelAbi.PioPageOffset, data.Length));
    }

    [Theory]
    [InlineData(1, new byte[] { 0x41 }, 0x41ul)]
    [InlineData(2, new byte[] { 0x34, 0x12 }, 0x1234ul)]
    [InlineData(4, new byte[] { 0x78, 0x56, 0x34, 0x12 }, 0x1234_5678ul)]
    public void Io_out_value_is_little_endian_of_the_access_size(int size, byte[] data, ulong expected)
    {
        // A stale byte after the access must not leak into the value.
        Io(KernelAbi.ExitIoOut, (byte)size, 0x3F8, 1, [.. data, 0xEE]);

        var io = Assert.IsType<VmExit.Io>(Decode());

        Assert.True(io.IsOut);
        Assert.Equal((ushort)0x3F8, io.Port);
        Assert.Equal(size, io.Size);
        Assert.Equal(1u, io.Count);
        Assert.Equal(expected, io.Value);
        Assert.Null(io.Data);
    }

    [Fact]
    public void Io_in_carries_port_size_and_count_but_no_value()
    {
        Io(KernelAbi.ExitIoIn, 2, 0x71, 1, [0xAA, 0xBB]);

        var io = Assert.IsType<VmExit.Io>(Decode());

        Assert.Equal(new VmExit.Io(false, 0x71, 2, 1, 0, null), io);
    }

    [Fact]
    public void Rep_out_keeps_every_element_in_data()
    {
        byte[] data = [0x01, 0x02, 0x03, 0x04, 0x05, 0x06];
        Io(KernelAbi.ExitIoOut, 2, 0x1F0, 3, data);

        var io = Assert.IsType<VmExit.Io>(Decode());

        Assert.True(io.IsOut);
        Assert.Equal(3u, io.Count);
        Assert.Equal(0x0201ul, io.Value); // the first element
        Assert.Equal(data, io.Data);
    }

    [Fact]
    public void Io_data_is_copied_out_of_the_page()
    {
        Io(KernelAbi.ExitIoOut, 1, 0x80, 2, [0x10, 0x20]);
        var io = Assert.IsType<VmExit.Io>(Decode());

        _page[KernelAbi.PioPageOffset] = 0xFF; // the next KVM_RUN reuses the page

        Assert.Equal(new byte[] { 0x10, 0x20 }, io.Data);
    }

    [Fact]
    public void Mmio_write_carries_len_bytes_of_value()
    {
        Set(KernelAbi.ExitReason, KernelAbi.ExitMmio);
        Set(KernelAbi.MmioPhysAddr, 0xFEE0_00B0ul);
        Set(KernelAbi.MmioData, 0xDEAD_BEEF_CAFE_F00Dul); // high bytes beyond len are junk
        Set(KernelAbi.MmioLen, 4u);
        Set(KernelAbi.MmioIsWrite, (byte)1);

        var mmio = Assert.IsType<VmExit.Mmio>(Decode());

        Assert.Equal(new VmExit.Mmio(0xFEE0_00B0, true, 4, 0xCAFE_F00D), mmio);
    }

    [Fact]
    public void Mmio_read_has_no_value()
    {
        Set(KernelAbi.ExitReason, KernelAbi.ExitMmio);
        Set(KernelAbi.MmioPhysAddr, 0xFEC0_0010ul);
        Set(KernelAbi.MmioData, 0x1122_3344_5566_7788ul);
        Set(KernelAbi.MmioLen, 8u);
        Set(KernelAbi.MmioIsWrite, (byte)0);

        var mmio = Assert.IsType<VmExit.Mmio>(Decode());

        Assert.Equal(new VmExit.Mmio(0xFEC0_0010, false, 8, 0), mmio);
    }

    [Fact]
    public void Internal_error_carries_suberror_and_ndata_words()
    {
        Set(KernelAbi.ExitReason, KernelAbi.ExitInternalError);
        Set(KernelAbi.InternalSuberror, 1u);
        Set(KernelAbi.InternalNdata, 2u);
        Set(KernelAbi.InternalData, 0x1111ul);
        Set(KernelAbi.InternalData + 8, 0x2222ul);
        Set(KernelAbi.InternalData + 16, 0x3333ul); // beyond ndata

        var error = Assert.IsType<VmExit.InternalError>(Decode());

        Assert.Equal(VmExit.InternalError.EmulationFailure, error.Suberror);
        Assert.Equal("emulation failure", error.SuberrorName);
        Assert.Equal(new ulong[] { 0x1111, 0x2222 }, error.Data);
    }

    [Fact]
    public void Fail_entry_carries_the_hardware_reason_and_cpu()
    {
        Set(KernelAbi.ExitReason, KernelAbi.ExitFailEntry);
        Set(KernelAbi.FailEntryReason, 0x8000_0021ul);
        Set(KernelAbi.FailEntryCpu, 3u);

        Assert.Equal(new VmExit.FailEntry(0x8000_0021, 3), Decode());
    }

    [Fact]
    public void Rdmsr_carries_index_and_reason()
    {
        Set(KernelAbi.ExitReason, KernelAbi.ExitX86Rdmsr);
        Set(KernelAbi.MsrReason, KernelAbi.MsrExitReasonFilter);
        Set(KernelAbi.MsrIndex, 0xC000_0080u);
        Set(KernelAbi.MsrData, 0x5555ul);

        Assert.Equal(new VmExit.MsrRead(0xC000_0080, KernelAbi.MsrExitReasonFilter), Decode());
    }

    [Fact]
    public void Wrmsr_carries_index_value_and_reason()
    {
        Set(KernelAbi.ExitReason, KernelAbi.ExitX86Wrmsr);
        Set(KernelAbi.MsrReason, KernelAbi.MsrExitReasonUnknown);
        Set(KernelAbi.MsrIndex, 0x6E0u);
        Set(KernelAbi.MsrData, 0x0123_4567_89AB_CDEFul);

        Assert.Equal(new VmExit.MsrWrite(0x6E0, 0x0123_4567_89AB_CDEF, KernelAbi.MsrExitReasonUnknown), Decode());
    }

    [Fact]
    public void System_event_carries_type_and_data()
    {
        Set(KernelAbi.ExitReason, KernelAbi.ExitSystemEvent);
        Set(KernelAbi.SystemEventType, VmExit.SystemEvent.ResetType);
        Set(KernelAbi.SystemEventNdata, 1u);
        Set(KernelAbi.SystemEventData, 0x77ul);

        var e = Assert.IsType<VmExit.SystemEvent>(Decode());

        Assert.Equal(VmExit.SystemEvent.ResetType, e.Type);
        Assert.Equal(new ulong[] { 0x77 }, e.Data);
    }

    [Fact]
    public void Hlt_decodes_to_the_singleton()
    {
        Set(KernelAbi.ExitReason, KernelAbi.ExitHlt);

        Assert.Same(VmExit.Hlt.Instance, Decode());
    }

    [Fact]
    public void Unknown_reason_is_reported_with_its_number()
    {
        Set(KernelAbi.ExitReason, 99u);

        Assert.Equal(new VmExit.Unknown(99), Decode());
    }

    [Fact]
    public void Dirty_ring_full_decodes_to_its_own_exit()
    {
        Set(KernelAbi.ExitReason, KernelAbi.ExitDirtyRingFull);
        Assert.Same(VmExit.DirtyRingFull.Instance, Decode());
    }

    [Fact]
    public void Run_view_reads_and_writes_the_control_bytes_at_kernel_offsets()
    {
        var view = new KvmRunView(_page);
        _page[KernelAbi.ReadyForInterruptInjection] = 1;
        _page[KernelAbi.IfFlag] = 1;

        view.ImmediateExit = true;
        view.RequestInterruptWindow = true;

        Assert.Equal(1, _page[KernelAbi.ImmediateExit]);
        Assert.Equal(1, _page[KernelAbi.RequestInterruptWindow]);
        Assert.True(view.ReadyForInterruptInjection);
        Assert.True(view.IfFlag);
    }
}
