using System.Buffers.Binary;
using ActorVmm.Devices.Virtio;
using ActorVmm.LibVmm;
using static ActorVmm.Devices.Virtio.VirtioBlkRequest;
using static ActorVmm.Devices.Virtio.VirtqFlags;

namespace ActorVmm.Devices.Tests.Virtio;

/// <summary>
/// virtio-blk (virtio 1.2 §5.2) over a real temporary file, driven through a split virtqueue built in
/// <see cref="TestGuestMemory"/> as a driver would: a header, data and a status byte per request.
/// Here the memory has no host view, so data goes through the model's bounce buffer;
/// <see cref="VirtioBlkThroughAHostViewTests"/> runs every test again with one.
/// </summary>
public class VirtioBlkTests : IDisposable
{
    private const ushort Size = 256;
    private const int Sectors = 2048; // a 1 MiB disk
    private const ulong Headers = 0x4_0000;
    private const ulong Statuses = 0x4_8000;
    private const ulong Data = 0x5_0000;
    private const ulong AllFeatures = VirtioFeatures.Version1 | VirtioBlkFeatures.Flush | VirtioBlkFeatures.SegMax
        | VirtioBlkFeatures.BlkSize | VirtioBlkFeatures.Discard | VirtioBlkFeatures.WriteZeroes;

    private readonly TestGuestMemory _m;
    private readonly DriverRing _d;
    private readonly string _path = System.IO.Path.Combine(System.IO.Path.GetTempPath(), $"vblk-{Guid.NewGuid():N}.img");
    private readonly byte[] _original;
    private IBlockBackend _file;
    private RecordingBackend _backend;
    private ulong _driverFeatures = AllFeatures;
    private VirtioBlk _blk;
    private SplitVirtqueue _q;
    private ushort _nextDesc;
    private ulong _nextHeader = Headers;
    private ulong _nextStatus = Statuses;

    public VirtioBlkTests() : this(hostView: false) { }

    protected VirtioBlkTests(bool hostView)
    {
        _m = new TestGuestMemory { HostView = hostView };
        _d = new DriverRing(_m, Size);
        _original = new byte[Sectors * SectorSize];
        for (var i = 0; i < _original.Length; i++) _original[i] = (byte)(i * 7 + i / SectorSize);
        File.WriteAllBytes(_path, _original);
        _file = FileBlockBackend.Open(_path, readOnly: false);
        _backend = new RecordingBackend(_file, () => _d.UsedIdx);
        _blk = NewBlk();
        _q = NewQueue();
    }

    public void Dispose()
    {
        _file.Dispose();
        File.Delete(_path);
        GC.SuppressFinalize(this);
    }

    private VirtioBlk NewBlk(string serial = "vblk-serial-0001") => new(_m, _backend, serial, () => _driverFeatures);

    private SplitVirtqueue NewQueue() =>
        SplitVirtqueue.Enable(new GuestRam(_m), Size, new GuestPhysAddr(_d.Desc), new GuestPhysAddr(_d.Avail),
            new GuestPhysAddr(_d.Used), VirtioFeatures.Version1);

    private void ReadOnlyDisk()
    {
        _file.Dispose();
        _file = FileBlockBackend.Open(_path, readOnly: true);
        _backend = new RecordingBackend(_file, () => _d.UsedIdx);
        _blk = NewBlk();
    }

    private void Process() => _blk.Process(0, _q);

    private static (ulong Addr, uint Len, bool Write) R(ulong addr, uint len) => (addr, len, false);
    private static (ulong Addr, uint Len, bool Write) W(ulong addr, uint len) => (addr, len, true);

    /// <summary>Links the buffers into a chain of consecutive descriptors and makes it available.</summary>
    private ushort Chain(params (ulong Addr, uint Len, bool Write)[] buffers)
    {
        var head = _nextDesc;
        for (var i = 0; i < buffers.Length; i++)
        {
            var index = (_nextDesc + i) % Size;
            var last = i == buffers.Length - 1;
            _d.SetDesc(index, buffers[i].Addr, buffers[i].Len,
                (ushort)((buffers[i].Write ? DescWrite : 0) | (last ? 0 : DescNext)), (ushort)((index + 1) % Size));
        }
        _nextDesc = (ushort)((_nextDesc + buffers.Length) % Size);
        _d.MakeAvailable(head);
        return head;
    }

    private ulong Header(uint type, ulong sector)
    {
        var at = _nextHeader;
        _nextHeader += HeaderSize;
        _m.SetU32(at, type);
        _m.SetU32(at + 4, 0);
        _m.SetU64(at + 8, sector);
        return at;
    }

    /// <summary>A status byte preset to 0xEE, so a test sees whether the device wrote it.</summary>
    private ulong StatusByte()
    {
        var at = _nextStatus++;
        _m.Fill(at, 1, 0xEE);
        return at;
    }

    private byte StatusAt(ulong at) => _m.Bytes(at, 1)[0];

    /// <summary>The usual framing (Linux's): header, data, status, each in its own descriptor.</summary>
    private ulong Request(uint type, ulong sector, ulong data = 0, uint length = 0, bool dataWritable = false)
    {
        var status = StatusByte();
        var header = R(Header(type, sector), HeaderSize);
        if (length == 0) Chain(header, W(status, 1));
        else Chain(header, (data, length, dataWritable), W(status, 1));
        return status;
    }

    private ulong ReadRequest(ulong sector, ulong data, uint length) => Request(In, sector, data, length, dataWritable: true);

    private ulong WriteRequest(ulong sector, ulong data, uint length) => Request(Out, sector, data, length);

    /// <summary>DISCARD / WRITE_ZEROES with the given segments at <paramref name="table"/>.</summary>
    private ulong ZeroRequest(uint type, ulong table, params (ulong Sector, uint Count, uint Flags)[] segments)
    {
        for (var i = 0; i < segments.Length; i++)
        {
            var s = table + (ulong)(i * SegmentSize);
            _m.SetU64(s, segments[i].Sector);
            _m.SetU32(s + 8, segments[i].Count);
            _m.SetU32(s + 12, segments[i].Flags);
        }
        return Request(type, 0, table, (uint)(segments.Length * SegmentSize));
    }

    private byte[] FileSectors(ulong sector, int count) => RawFile.Read(_path, (long)sector * SectorSize, count * SectorSize);

    private byte[] OriginalSectors(ulong sector, int count) => _original.AsSpan((int)sector * SectorSize, count * SectorSize).ToArray();

    private static byte[] Pattern(int length, byte seed)
    {
        var b = new byte[length];
        for (var i = 0; i < b.Length; i++) b[i] = (byte)(seed + i * 13);
        return b;
    }

    private void Put(ulong at, byte[] bytes)
    {
        Assert.True(_m.TryWrite(new GuestPhysAddr(at), bytes));
    }

    private void AssertFileUnchanged() => Assert.Equal(_original, RawFile.Read(_path, 0, _original.Length));

    // ---------------------------------------------------------------- identity and configuration

    [Fact]
    public void Config_reports_capacity_seg_max_blk_size_and_the_discard_limits_at_any_access_size()
    {
        Assert.Equal(2, _blk.DeviceId);
        Assert.Equal([VirtioBlk.QueueSize], _blk.QueueMaxSizes);
        Assert.Equal(VirtioBlkFeatures.SegMax | VirtioBlkFeatures.BlkSize | VirtioBlkFeatures.Flush
            | VirtioBlkFeatures.Discard | VirtioBlkFeatures.WriteZeroes, _blk.Features);
        Assert.Equal(60, _blk.ConfigLength);

        Assert.Equal((ulong)Sectors, _blk.ReadConfig(0, 8));
        Assert.Equal((ulong)Sectors, _blk.ReadConfig(0, 4));
        Assert.Equal(0UL, _blk.ReadConfig(4, 4));
        Assert.Equal((ulong)(Sectors >> 8), _blk.ReadConfig(1, 1));
        Assert.Equal(254UL, _blk.ReadConfig(12, 4));          // seg_max
        Assert.Equal(254UL, _blk.ReadConfig(12, 2));
        Assert.Equal(512UL, _blk.ReadConfig(20, 4));          // blk_size
        Assert.Equal(4194303UL, _blk.ReadConfig(36, 4));      // max_discard_sectors
        Assert.Equal(16UL, _blk.ReadConfig(40, 4));           // max_discard_seg
        Assert.Equal(8UL, _blk.ReadConfig(44, 4));            // discard_sector_alignment
        Assert.Equal(4194303UL, _blk.ReadConfig(48, 4));      // max_write_zeroes_sectors
        Assert.Equal(16UL, _blk.ReadConfig(52, 4));           // max_write_zeroes_seg
        Assert.Equal(1UL, _blk.ReadConfig(56, 1));            // write_zeroes_may_unmap
        Assert.Equal(0UL, _blk.ReadConfig(57, 2));            // unused1
        Assert.Equal(16UL | (8UL << 32), _blk.ReadConfig(40, 8));
        Assert.Equal(0x01UL, _blk.ReadConfig(56, 8));         // past the layout reads 0
        Assert.Equal(0UL, _blk.ReadConfig(1000, 4));

        _blk.WriteConfig(0, 8, 0xFFFF);
        Assert.Equal((ulong)Sectors, _blk.ReadConfig(0, 8));
    }

    [Fact]
    public void Read_only_disk_offers_RO_and_neither_discard_nor_write_zeroes()
    {
        ReadOnlyDisk();

        Assert.Equal(VirtioBlkFeatures.SegMax | VirtioBlkFeatures.BlkSize | VirtioBlkFeatures.Flush | VirtioBlkFeatures.ReadOnly,
            _blk.Features);
        Assert.Equal((ulong)Sectors, _blk.ReadConfig(0, 8));
        Assert.Equal(0UL, _blk.ReadConfig(36, 8));
        Assert.Equal(0UL, _blk.ReadConfig(48, 8));
        Assert.Equal(0UL, _blk.ReadConfig(56, 1));
    }

    [Fact]
    public void A_serial_longer_than_20_bytes_or_not_ascii_is_refused()
    {
        Assert.Throws<ArgumentException>(() => NewBlk("012345678901234567890"));
        Assert.Throws<ArgumentException>(() => NewBlk("disk-é"));
        NewBlk("01234567890123456789");
    }

    // ---------------------------------------------------------------- reads, writes, flush, get-id

    [Fact]
    public void Read_fills_the_data_buffers_from_the_file()
    {
        _m.Fill(Data, 0x800, 0xEE);
        var status = StatusByte();
        Chain(R(Header(In, 3), HeaderSize), W(Data, 512), W(Data + 0x400, 1024), W(status, 1));

        Process();

        Assert.Equal(StatusOk, StatusAt(status));
        Assert.Equal(OriginalSectors(3, 1), _m.Bytes(Data, 512));
        Assert.Equal(OriginalSectors(4, 2), _m.Bytes(Data + 0x400, 1024));
        Assert.Equal([0xEE, 0xEE], _m.Bytes(Data + 512, 2)); // nothing between the buffers
        Assert.Equal(1, _d.UsedIdx);
        Assert.Equal((0u, 512u + 1024u + 1u), _d.UsedElem(0));
    }

    [Fact]
    public void Data_goes_straight_through_the_host_view_where_the_memory_has_one()
    {
        var data = Pattern(1024, 0x52);
        Put(Data, data);
        var write = WriteRequest(9, Data, 1024);
        var read = ReadRequest(9, Data + 0x1000, 1024);

        Process();

        Assert.Equal(StatusOk, StatusAt(write));
        Assert.Equal(StatusOk, StatusAt(read));
        Assert.Equal(data, FileSectors(9, 2));
        Assert.Equal(data, _m.Bytes(Data + 0x1000, 1024));
        // With a host view: one view per data buffer and one vectored call per request; without, none.
        Assert.Equal(_m.HostView ? 2 : 0, _m.HostViewsGiven);
        Assert.Equal(["write", "read"], _backend.Calls.Select(c => c.Op));
    }

    [Fact]
    public void Sectors_past_the_end_of_a_file_cut_short_after_it_was_opened_read_as_zeroes()
    {
        RawFile.Truncate(_path, 10 * SectorSize + 100); // the capacity the driver was told stays
        _m.Fill(Data, 0x1000, 0xEE);
        var status = StatusByte();
        Chain(R(Header(In, 9), HeaderSize), W(Data, 1024), W(Data + 0x800, 1024), W(status, 1));

        Process();

        Assert.Equal(StatusOk, StatusAt(status));
        Assert.Equal(OriginalSectors(9, 1), _m.Bytes(Data, 512));
        Assert.Equal(OriginalSectors(10, 1)[..100], _m.Bytes(Data + 512, 100));
        Assert.Equal(new byte[1024 - 612], _m.Bytes(Data + 612, 1024 - 612));
        Assert.Equal(new byte[1024], _m.Bytes(Data + 0x800, 1024));
        Assert.Equal(0xEE, _m.Bytes(Data + 0x400, 1)[0]); // nothing between the buffers
    }

    [Fact]
    public void Written_sectors_are_in_the_file_and_read_back()
    {
        var data = Pattern(3 * 512, 0x31);
        Put(Data, data[..1024]);
        Put(Data + 0x1000, data[1024..]);
        var status = StatusByte();
        Chain(R(Header(Out, 5), HeaderSize), R(Data, 1024), R(Data + 0x1000, 512), W(status, 1));

        Process();

        Assert.Equal(StatusOk, StatusAt(status));
        Assert.Equal((0u, 1u), _d.UsedElem(0));
        Assert.Equal(data, FileSectors(5, 3));
        Assert.Equal(OriginalSectors(4, 1), FileSectors(4, 1));
        Assert.Equal(OriginalSectors(8, 1), FileSectors(8, 1));

        var back = ReadRequest(5, Data + 0x2000, 3 * 512);
        Process();
        Assert.Equal(StatusOk, StatusAt(back));
        Assert.Equal(data, _m.Bytes(Data + 0x2000, 3 * 512));
    }

    [Fact]
    public void A_write_is_in_the_file_before_its_used_entry_and_a_flush_syncs_before_its_own()
    {
        Put(Data, Pattern(512, 1));
        WriteRequest(10, Data, 512);
        var flush = Request(VirtioBlkRequest.Flush, 0);
        WriteRequest(11, Data, 512);

        Process();

        Assert.Equal(3, _d.UsedIdx);
        Assert.Equal(StatusOk, StatusAt(flush));
        Assert.Equal(
            [new("write", 10 * 512, 512, 0), new("flush", 0, 0, 1), new("write", 11 * 512, 512, 2)],
            _backend.Calls);
    }

    [Fact]
    public void Without_a_negotiated_flush_every_write_is_synced_before_it_completes()
    {
        // §5.2.6.2: FLUSH offered but not negotiated: a completed write must be stable.
        _driverFeatures = AllFeatures & ~VirtioBlkFeatures.Flush;
        Put(Data, Pattern(512, 1));
        WriteRequest(10, Data, 512);
        ZeroRequest(WriteZeroes, Data + 0x1000, (20, 2, 0));
        ReadRequest(0, Data + 0x2000, 512);

        Process();

        Assert.Equal(
            [new("write", 10 * 512, 512, 0), new("flush", 0, 0, 0), new("zero", 20 * 512, 1024, 1), new("flush", 0, 0, 1),
                new("read", 0, 512, 2)],
            _backend.Calls);
    }

    [Fact]
    public void Get_id_returns_the_serial_nul_padded_to_20_bytes()
    {
        _m.Fill(Data, 32, 0xEE);
        var status = Request(GetId, 0, Data, IdBytes, dataWritable: true);

        Process();

        Assert.Equal(StatusOk, StatusAt(status));
        Assert.Equal("vblk-serial-0001\0\0\0\0"u8.ToArray(), _m.Bytes(Data, 20));
        Assert.Equal(0xEE, _m.Bytes(Data + 20, 1)[0]);
        Assert.Equal((0u, 21u), _d.UsedElem(0));
    }

    [Fact]
    public void Get_id_into_a_buffer_that_is_not_20_bytes_is_an_io_error()
    {
        // §5.2.6.1: the data of GET_ID MUST be 20 bytes.
        _m.Fill(Data, 32, 0xEE);
        var status = Request(GetId, 0, Data, 19, dataWritable: true);

        Process();

        Assert.Equal(StatusIoErr, StatusAt(status));
        Assert.Equal(Enumerable.Repeat((byte)0xEE, 19), _m.Bytes(Data, 19));
    }

    [Fact]
    public void A_write_to_a_read_only_disk_is_an_io_error_and_writes_nothing()
    {
        ReadOnlyDisk();
        Put(Data, Pattern(512, 1));
        var write = WriteRequest(0, Data, 512);
        var discard = ZeroRequest(VirtioBlkRequest.Discard, Data + 0x1000, (0, 1, 0));
        var zeroes = ZeroRequest(WriteZeroes, Data + 0x2000, (0, 1, 0));
        var read = ReadRequest(1, Data + 0x3000, 512);
        var flush = Request(VirtioBlkRequest.Flush, 0);

        Process();

        Assert.Equal(StatusIoErr, StatusAt(write));
        Assert.Equal(StatusUnsupported, StatusAt(discard)); // not offered by a read-only disk
        Assert.Equal(StatusUnsupported, StatusAt(zeroes));
        Assert.Equal(StatusOk, StatusAt(read));
        Assert.Equal(OriginalSectors(1, 1), _m.Bytes(Data + 0x3000, 512));
        Assert.Equal(StatusOk, StatusAt(flush));
        Assert.Equal(["read", "flush"], _backend.Calls.Select(c => c.Op));
        AssertFileUnchanged();
    }

    // ---------------------------------------------------------------- discard and write zeroes

    [Fact]
    public void Write_zeroes_reads_back_as_zeroes_with_or_without_unmap_and_leaves_the_neighbours()
    {
        var status = ZeroRequest(WriteZeroes, Data, (3, 2, 0), (100, 9, FlagUnmap));

        Process();

        Assert.Equal(StatusOk, StatusAt(status));
        Assert.Equal(new byte[2 * 512], FileSectors(3, 2));
        Assert.Equal(new byte[9 * 512], FileSectors(100, 9));
        Assert.Equal(OriginalSectors(2, 1), FileSectors(2, 1));
        Assert.Equal(OriginalSectors(5, 1), FileSectors(5, 1));
        Assert.Equal(OriginalSectors(99, 1), FileSectors(99, 1));
        Assert.Equal(OriginalSectors(109, 1), FileSectors(109, 1));
        Assert.Equal(_original.Length, new FileInfo(_path).Length);
    }

    [Fact]
    public void Discard_succeeds_and_leaves_the_sectors_around_it()
    {
        // §5.2.6.2: the device MAY deallocate; what a discarded range reads back is not specified.
        var status = ZeroRequest(VirtioBlkRequest.Discard, Data, (8, 16, 0));

        Process();

        Assert.Equal(StatusOk, StatusAt(status));
        Assert.Equal([new("discard", 8 * 512, 16 * 512, 0)], _backend.Calls);
        Assert.Equal(OriginalSectors(7, 1), FileSectors(7, 1));
        Assert.Equal(OriginalSectors(24, 1), FileSectors(24, 1));
        Assert.Equal(_original.Length, new FileInfo(_path).Length);
    }

    [Fact]
    public void Discard_with_unmap_or_an_unknown_flag_is_unsupported_and_does_nothing()
    {
        // §5.2.6.2: UNSUPP for any unknown flag, and for unmap on a discard.
        var unmap = ZeroRequest(VirtioBlkRequest.Discard, Data, (0, 1, 0), (8, 1, FlagUnmap));
        var unknown = ZeroRequest(WriteZeroes, Data + 0x100, (0, 1, 0), (8, 1, 0b10));

        Process();

        Assert.Equal(StatusUnsupported, StatusAt(unmap));
        Assert.Equal(StatusUnsupported, StatusAt(unknown));
        Assert.Empty(_backend.Calls);
        AssertFileUnchanged();
    }

    [Fact]
    public void Discard_and_write_zeroes_beyond_their_limits_are_io_errors_and_do_nothing()
    {
        var segments = Enumerable.Range(0, 17).Select(i => ((ulong)i, 1u, 0u)).ToArray();
        var tooManySegments = ZeroRequest(WriteZeroes, Data, segments);
        var tooManySectors = ZeroRequest(WriteZeroes, Data + 0x400, (0, VirtioBlk.MaxZeroSectors + 1, 0));
        var pastTheEnd = ZeroRequest(WriteZeroes, Data + 0x800, (0, 1, 0), (Sectors - 1, 2, 0)); // the first is valid
        var overflow = ZeroRequest(VirtioBlkRequest.Discard, Data + 0xC00, (ulong.MaxValue - 1, 4, 0));
        var noSegment = Request(WriteZeroes, 0);
        var ragged = Request(WriteZeroes, 0, Data, 24);

        Process();

        Assert.Equal(StatusIoErr, StatusAt(tooManySegments));
        Assert.Equal(StatusIoErr, StatusAt(tooManySectors));
        Assert.Equal(StatusIoErr, StatusAt(pastTheEnd));
        Assert.Equal(StatusIoErr, StatusAt(overflow));
        Assert.Equal(StatusIoErr, StatusAt(noSegment));
        Assert.Equal(StatusIoErr, StatusAt(ragged));
        Assert.Empty(_backend.Calls);
        AssertFileUnchanged();
    }

    // ---------------------------------------------------------------- capacity and lengths

    [Fact]
    public void The_last_sector_is_readable_and_writable_and_one_past_it_is_an_io_error()
    {
        _m.Fill(Data, 0x2000, 0xEE);
        var last = ReadRequest(Sectors - 1, Data, 512);
        var pastEnd = ReadRequest(Sectors, Data + 0x400, 512);
        var straddling = ReadRequest(Sectors - 1, Data + 0x800, 1024);
        Put(Data + 0x1000, Pattern(512, 9));
        var lastWrite = WriteRequest(Sectors - 1, Data + 0x1000, 512);
        var pastEndWrite = WriteRequest(Sectors, Data + 0x1000, 512);

        Process();

        Assert.Equal(StatusOk, StatusAt(last));
        Assert.Equal(OriginalSectors(Sectors - 1, 1), _m.Bytes(Data, 512));
        Assert.Equal(StatusIoErr, StatusAt(pastEnd));
        Assert.Equal(StatusIoErr, StatusAt(straddling));
        Assert.Equal(Enumerable.Repeat((byte)0xEE, 1024), _m.Bytes(Data + 0x800, 1024)); // nothing read
        Assert.Equal(StatusOk, StatusAt(lastWrite));
        Assert.Equal(Pattern(512, 9), FileSectors(Sectors - 1, 1));
        Assert.Equal(StatusIoErr, StatusAt(pastEndWrite));
        Assert.Equal(_original.Length, new FileInfo(_path).Length); // the file did not grow
        Assert.Equal(5, _d.UsedIdx);
    }

    [Fact]
    public void A_sector_whose_byte_offset_overflows_is_an_io_error()
    {
        var wraps = ReadRequest(ulong.MaxValue / 512 + 1, Data, 512); // sector * 512 wraps to 0
        var top = WriteRequest(ulong.MaxValue, Data, 512);
        var fine = ReadRequest(1, Data, 512); // the queue keeps going

        Process();

        Assert.Equal(StatusIoErr, StatusAt(wraps));
        Assert.Equal(StatusIoErr, StatusAt(top));
        Assert.Equal(StatusOk, StatusAt(fine));
        Assert.Equal([new("read", 512, 512, 2)], _backend.Calls);
        AssertFileUnchanged();
    }

    [Fact]
    public void A_data_length_that_is_not_a_multiple_of_512_is_an_io_error()
    {
        // §5.2.6.1: the data of IN and OUT MUST be a multiple of 512 bytes.
        _m.Fill(Data, 0x400, 0xEE);
        var read = ReadRequest(0, Data, 511);
        var write = WriteRequest(0, Data, 513);

        Process();

        Assert.Equal(StatusIoErr, StatusAt(read));
        Assert.Equal(StatusIoErr, StatusAt(write));
        Assert.Empty(_backend.Calls);
        Assert.Equal(Enumerable.Repeat((byte)0xEE, 511), _m.Bytes(Data, 511));
    }

    [Fact]
    public void A_huge_read_within_the_capacity_is_carried_out_in_chunks_and_a_huge_one_beyond_it_not_at_all()
    {
        const uint huge = 0x8_0000; // 1024 sectors: two bounce buffers, or one vectored read of two pieces
        var ok = ReadRequest(Sectors - 1024, 0x8_0000, huge);
        var beyond = ReadRequest(Sectors - 1023, 0x8_0000, huge);

        Process();

        Assert.Equal(StatusOk, StatusAt(ok));
        Assert.Equal(OriginalSectors(Sectors - 1024, 1024), _m.Bytes(0x8_0000, (int)huge));
        Assert.Equal(StatusIoErr, StatusAt(beyond));
        Assert.Equal(_m.HostView ? 1 : huge / VirtioBlk.ChunkBytes, (uint)_backend.Calls.Count);
        Assert.Equal(huge, (uint)_backend.Calls.Sum(c => c.Length));
        Assert.All(_backend.Calls, c => Assert.Equal("read", c.Op));
    }

    // ---------------------------------------------------------------- framing and hostile chains

    [Fact]
    public void A_header_split_over_descriptors_and_data_sharing_the_status_descriptor_work()
    {
        // §2.6.4: the device must not assume a particular arrangement of descriptors.
        var header = Header(In, 2);
        _m.Fill(Data, 513, 0xEE);
        Chain(R(header, 5), R(header + 5, 11), W(Data, 513)); // data and status in one buffer

        Process();

        Assert.Equal(OriginalSectors(2, 1), _m.Bytes(Data, 512));
        Assert.Equal(StatusOk, _m.Bytes(Data + 512, 1)[0]);
        Assert.Equal((0u, 513u), _d.UsedElem(0));
    }

    [Fact]
    public void A_header_shorter_than_16_bytes_is_an_io_error()
    {
        var status = StatusByte();
        Chain(R(Header(Out, 0), 15), W(status, 1));

        Process();

        Assert.Equal(StatusIoErr, StatusAt(status));
        Assert.Empty(_backend.Calls);
    }

    [Fact]
    public void Data_on_the_wrong_side_is_an_io_error()
    {
        _m.Fill(Data, 0x400, 0xEE);
        var readWithReadableData = Request(In, 0, Data, 512, dataWritable: false);
        var writeWithWritableData = Request(Out, 0, Data, 512, dataWritable: true);

        Process();

        Assert.Equal(StatusIoErr, StatusAt(readWithReadableData));
        Assert.Equal(StatusIoErr, StatusAt(writeWithWritableData));
        Assert.Empty(_backend.Calls);
        Assert.Equal(Enumerable.Repeat((byte)0xEE, 512), _m.Bytes(Data, 512));
        AssertFileUnchanged();
    }

    [Fact]
    public void A_chain_without_a_writable_status_byte_is_returned_unexecuted()
    {
        Put(Data, Pattern(512, 3));
        var status = StatusByte();
        Chain(R(Header(Out, 0), HeaderSize), R(Data, 512), R(status, 1)); // status not device-writable
        var next = ReadRequest(0, Data + 0x1000, 512);

        Process();

        Assert.Equal(2, _d.UsedIdx);
        Assert.Equal((0u, 0u), _d.UsedElem(0));
        Assert.Equal(0xEE, StatusAt(status));
        Assert.Equal(StatusOk, StatusAt(next));
        Assert.Equal(["read"], _backend.Calls.Select(c => c.Op));
        AssertFileUnchanged();
    }

    [Fact]
    public void More_data_segments_than_seg_max_is_an_io_error()
    {
        // 255 data segments fit a 256-entry chain only with the last one sharing the status descriptor.
        (ulong, uint, bool)[] Segments(ulong header, ulong data, int count) =>
        [
            R(header, HeaderSize),
            .. Enumerable.Range(0, count - 1).Select(i => W(data + (ulong)i * 512, 512)),
            W(data + (ulong)(count - 1) * 512, 513),
        ];
        var tooMany = Segments(Header(In, 0), 0x8_0000, 255);
        Chain(tooMany);
        Process();

        Assert.Equal(StatusIoErr, _m.Bytes(0x8_0000 + 255 * 512, 1)[0]);
        Assert.Empty(_backend.Calls);

        _nextDesc = 0;
        Chain(Segments(Header(In, 0), 0x8_0000, 254));
        Process();

        Assert.Equal(StatusOk, _m.Bytes(0x8_0000 + 254 * 512, 1)[0]);
        Assert.Equal(OriginalSectors(0, 254), _m.Bytes(0x8_0000, 254 * 512));
    }

    [Fact]
    public void A_data_buffer_outside_ram_breaks_the_queue_before_the_file_or_ram_is_touched()
    {
        // SplitVirtqueue refuses the chain; the transport then sets DEVICE_NEEDS_RESET (§2.1.2).
        var status = StatusByte();
        Chain(R(Header(In, 0), HeaderSize), W(TestGuestMemory.RamSize - 256, 512), W(status, 1));

        Process();

        Assert.Equal(VirtqueueError.BufferOutsideRam, _q.Error);
        Assert.Equal(0, _d.UsedIdx);
        Assert.Equal(0xEE, StatusAt(status));
        Assert.Empty(_backend.Calls);
        Assert.Equal(0, _m.AccessesOutside);
        Assert.Equal(0, _m.RomWrites);
    }

    [Theory]
    [InlineData(2u)]  // VIRTIO_BLK_T_SCSI_CMD (legacy)
    [InlineData(5u)]  // VIRTIO_BLK_T_FLUSH_OUT (legacy)
    [InlineData(10u)] // VIRTIO_BLK_T_GET_LIFETIME, not offered
    [InlineData(14u)] // VIRTIO_BLK_T_SECURE_ERASE, not offered
    [InlineData(16u)] // VIRTIO_BLK_T_ZONE_REPORT, not offered
    [InlineData(0xFFFF_FFFFu)]
    public void An_unknown_request_type_is_unsupported(uint type)
    {
        var status = Request(type, 0, Data, 512, dataWritable: true);

        Process();

        Assert.Equal(StatusUnsupported, StatusAt(status));
        Assert.Empty(_backend.Calls);
    }

    [Fact]
    public void A_host_io_error_is_an_io_error_status_and_the_device_keeps_working()
    {
        _backend.Fail = true;
        Put(Data, Pattern(512, 5));
        var read = ReadRequest(0, Data + 0x1000, 512);
        var write = WriteRequest(0, Data, 512);
        var flush = Request(VirtioBlkRequest.Flush, 0);
        var zeroes = ZeroRequest(WriteZeroes, Data + 0x2000, (0, 1, 0));

        Process();

        Assert.Equal(new byte[] { StatusIoErr, StatusIoErr, StatusIoErr, StatusIoErr }, new[] { read, write, flush, zeroes }.Select(StatusAt));
        Assert.Equal(4, _d.UsedIdx);
        Assert.Null(_q.Error);

        _backend.Fail = false;
        var again = WriteRequest(0, Data, 512);
        Process();
        Assert.Equal(StatusOk, StatusAt(again));
        Assert.Equal(Pattern(512, 5), FileSectors(0, 1));
    }

    [Fact]
    public void A_random_driver_never_makes_the_device_throw_or_touch_memory_outside_ram()
    {
        var rng = new Random(2);
        for (var round = 0; round < 300; round++)
        {
            for (var i = 0; i < 8; i++)
            {
                var at = Headers + (ulong)i * 16;
                _m.SetU32(at, (uint)rng.Next(0, 16));
                _m.SetU64(at + 8, rng.Next(3) == 0 ? (ulong)rng.NextInt64() : (ulong)rng.Next(0, Sectors + 2));
            }
            var n = rng.Next(1, 6);
            var buffers = Enumerable.Range(0, n).Select(i => i == 0
                ? (Headers + (ulong)rng.Next(0, 8) * 16, (uint)rng.Next(0, 40), false)
                : (Data + (ulong)rng.Next(0, 0x8_0000), (uint)rng.Next(0, 0x2000), rng.Next(2) == 0)).ToArray();
            Array.Sort(buffers, (a, b) => a.Item3.CompareTo(b.Item3));
            Chain(buffers);
            Process();
            Assert.Null(_q.Error);
        }
        Assert.Equal(300, _d.UsedIdx);
        Assert.Equal(0, _m.AccessesOutside);
        Assert.Equal(0, _m.RomWrites);
        Assert.Equal(_original.Length, new FileInfo(_path).Length);
    }

    // ---------------------------------------------------------------- restart

    [Fact]
    public void A_model_rebuilt_from_its_state_mid_stream_continues_with_the_next_chain_and_redoes_none()
    {
        Put(Data, Pattern(512, 1));
        Put(Data + 0x200, Pattern(512, 2));
        Put(Data + 0x400, Pattern(512, 3));
        Put(Data + 0x600, Pattern(512, 4));
        WriteRequest(1, Data, 512);
        WriteRequest(2, Data + 0x200, 512);
        Process();
        Assert.Equal(2, _d.UsedIdx);

        // Two more requests; the model takes the third and fails before its used entry.
        var third = WriteRequest(3, Data + 0x400, 512);
        var fourth = WriteRequest(4, Data + 0x600, 512);
        Assert.True(_q.TryPop(out _));
        var blkState = DeviceStateCodec.Decode(DeviceStateCodec.Encode(_blk.State()));
        var queueState = _q.State();
        _backend.Calls.Clear();

        var restarted = VirtioBlk.FromState(Assert.IsType<VirtioBlkState>(blkState), _m, _backend, "vblk-serial-0001",
            () => _driverFeatures);
        var ring = SplitVirtqueue.FromState(new GuestRam(_m), queueState, VirtioFeatures.Version1);
        restarted.Process(0, ring);

        Assert.Equal(4, _d.UsedIdx);
        Assert.Equal([(6u, 1u), (9u, 1u)], [_d.UsedElem(2), _d.UsedElem(3)]);
        Assert.Equal(new byte[] { StatusOk, StatusOk }, new[] { third, fourth }.Select(StatusAt));
        Assert.Equal([new("write", 3 * 512, 512, 2), new("write", 4 * 512, 512, 3)], _backend.Calls);
        Assert.Equal([.. Pattern(512, 1), .. Pattern(512, 2), .. Pattern(512, 3), .. Pattern(512, 4)], FileSectors(1, 4));
        Assert.Equal(_blk.ReadConfig(0, 8), restarted.ReadConfig(0, 8));
    }

    [Fact]
    public void A_restarted_model_keeps_the_capacity_the_driver_was_told()
    {
        var state = _blk.State();
        Assert.Equal(new VirtioBlkState(Sectors), state);
        using (var grow = File.Open(_path + ".other", FileMode.Create)) grow.SetLength(4 * Sectors * 512L);
        try
        {
            using var other = FileBlockBackend.Open(_path + ".other", readOnly: false);
            var restarted = VirtioBlk.FromState(state, _m, other, "x", () => _driverFeatures);
            Assert.Equal((ulong)Sectors, restarted.ReadConfig(0, 8));
            Assert.Equal((ulong)Sectors * 4, new VirtioBlk(_m, other, "x", () => _driverFeatures).Capacity);
        }
        finally
        {
            File.Delete(_path + ".other");
        }
    }
}

/// <summary>
/// Every <see cref="VirtioBlkTests"/> test with guest memory that has a host view, as a VM's has: data
/// then goes straight between the file and guest memory
/// (<see cref="VirtioBlkTests.Data_goes_straight_through_the_host_view_where_the_memory_has_one"/>
/// checks that it did).
/// </summary>
public sealed class VirtioBlkThroughAHostViewTests() : VirtioBlkTests(hostView: true)
{
}
