using System.Buffers.Binary;
using System.Text;
using ActorVmm.LibVmm;

namespace ActorVmm.Devices.Virtio;

/// <summary>virtio-blk feature bits (virtio 1.2 §5.2.3), as masks of the 64-bit feature word.</summary>
public static class VirtioBlkFeatures
{
    /// <summary>VIRTIO_BLK_F_SEG_MAX (2): <c>seg_max</c> is the most data segments in one request.</summary>
    public const ulong SegMax = 1UL << 2;
    /// <summary>VIRTIO_BLK_F_RO (5): the device is read-only.</summary>
    public const ulong ReadOnly = 1UL << 5;
    /// <summary>VIRTIO_BLK_F_BLK_SIZE (6): <c>blk_size</c> is valid.</summary>
    public const ulong BlkSize = 1UL << 6;
    /// <summary>VIRTIO_BLK_F_FLUSH (9): VIRTIO_BLK_T_FLUSH is supported.</summary>
    public const ulong Flush = 1UL << 9;
    /// <summary>VIRTIO_BLK_F_DISCARD (13): VIRTIO_BLK_T_DISCARD, limits in max_discard_*.</summary>
    public const ulong Discard = 1UL << 13;
    /// <summary>VIRTIO_BLK_F_WRITE_ZEROES (14): VIRTIO_BLK_T_WRITE_ZEROES, limits in max_write_zeroes_*.</summary>
    public const ulong WriteZeroes = 1UL << 14;
}

/// <summary>Request types and status values of <c>struct virtio_blk_req</c> (virtio 1.2 §5.2.6).</summary>
public static class VirtioBlkRequest
{
    public const uint In = 0;
    public const uint Out = 1;
    public const uint Flush = 4;
    public const uint GetId = 8;
    public const uint Discard = 11;
    public const uint WriteZeroes = 13;

    public const byte StatusOk = 0;
    public const byte StatusIoErr = 1;
    public const byte StatusUnsupported = 2;

    /// <summary>type, reserved, sector: the device-readable header every request starts with.</summary>
    public const int HeaderSize = 16;
    /// <summary><c>struct virtio_blk_discard_write_zeroes { le64 sector; le32 num_sectors; le32 flags; }</c>.</summary>
    public const int SegmentSize = 16;
    /// <summary>VIRTIO_BLK_ID_BYTES: the device ID string of GET_ID.</summary>
    public const int IdBytes = 20;
    public const int SectorSize = 512;
    /// <summary>flags.unmap of a discard / write-zeroes segment; every other bit is reserved.</summary>
    public const uint FlagUnmap = 1;
}

/// <summary>
/// What a virtio-blk model needs to continue after a restart: the capacity the driver was told
/// (sectors), kept so that a restarted model never changes it without a configuration change
/// notification (§5.2.6.2), even if the file changed length meanwhile.
/// </summary>
public sealed record VirtioBlkState(ulong Capacity);

/// <summary>
/// virtio block device (virtio 1.2 §5.2): device ID 2, one request queue, backed by an
/// <see cref="IBlockBackend"/>. Features offered: SEG_MAX, BLK_SIZE (512), FLUSH, and RO for a
/// read-only store, otherwise DISCARD and WRITE_ZEROES.
///
/// Requests (§5.2.6) are <c>le32 type; le32 reserved; le64 sector; u8 data[]; u8 status;</c> spread over
/// the chain in any framing (§2.6.4: the device assumes no descriptor boundaries): the first 16
/// device-readable bytes are the header, the last device-writable byte is the status, and the bytes
/// between are the data (device-readable for OUT, DISCARD, WRITE_ZEROES; device-writable for IN and
/// GET_ID). Each request is checked before anything is read from or written to the store:
/// <list type="bullet">
/// <item>no device-writable byte: there is no status to report, so the request is not carried out and
/// its chain is returned with length 0;</item>
/// <item>a header shorter than 16 bytes, data on the wrong side (readable data for IN / GET_ID, writable
/// data for OUT / DISCARD / WRITE_ZEROES), a data length that is not a multiple of 512 (IN, OUT), of 16
/// (DISCARD, WRITE_ZEROES) or not 20 (GET_ID) (§5.2.6.1), more data segments than <c>seg_max</c>, a
/// sector range beyond <c>capacity</c> (overflow included), more segments or sectors than
/// <c>max_discard_*</c> / <c>max_write_zeroes_*</c>: VIRTIO_BLK_S_IOERR ("device or driver error");</item>
/// <item>OUT, DISCARD or WRITE_ZEROES on a read-only disk: IOERR and no data written (§5.2.6.2);</item>
/// <item>an unknown request type, DISCARD / WRITE_ZEROES on a disk that does not offer them, a segment
/// flag other than unmap, unmap on a DISCARD: VIRTIO_BLK_S_UNSUPP (§5.2.6.2);</item>
/// <item>an I/O error of the store (<see cref="IOException"/>): IOERR; never an exception out of the model.</item>
/// </list>
/// A buffer outside guest RAM never reaches this model: <see cref="SplitVirtqueue"/> refuses the chain
/// and the device goes to DEVICE_NEEDS_RESET.
///
/// Durability (§5.2.6.2): requests complete synchronously inside <see cref="Process"/>; a chain is put
/// on the used ring only after the store returned, so no write is acknowledged before pwrite returned,
/// and FLUSH is acknowledged after fsync. FLUSH is always offered; if the driver did not negotiate it
/// (so it cannot ask for one), every write is flushed before it completes (§5.2.6.2 case 1).
///
/// Used length (§2.7.8): the whole device-writable length of the chain, status byte included (the
/// device wrote the data of a successful IN or GET_ID and the status at its end); a failed IN leaves
/// its data bytes as they were.
///
/// Restarts: the model holds no request between two calls, so the used ring is the whole truth
/// (<see cref="SplitVirtqueue.FromState"/>): a chain put there before the restart is not done again, a
/// chain taken but not yet put there (the model failed while carrying it out) is taken again and done
/// once more. Every request type is idempotent while the driver waits for it (the driver does not touch
/// a buffer it made available until the device returns it, §2.7.13), so none is lost or doubled in
/// effect. The record (<see cref="VirtioBlkState"/>) keeps the capacity the driver was told.
/// </summary>
public sealed class VirtioBlk : IVirtioDevice
{
    public const ushort VirtioDeviceId = 2;
    public const ushort QueueSize = 256;
    /// <summary>seg_max: data segments of one request, as many as a chain of <see cref="QueueSize"/>
    /// descriptors holds besides the header and the status.</summary>
    public const uint SegMax = QueueSize - 2;
    public const uint BlockSize = VirtioBlkRequest.SectorSize;
    /// <summary>max_discard_sectors and max_write_zeroes_sectors: just under 2 GiB per segment.</summary>
    public const uint MaxZeroSectors = int.MaxValue / VirtioBlkRequest.SectorSize;
    /// <summary>max_discard_seg and max_write_zeroes_seg.</summary>
    public const uint MaxZeroSegments = 16;
    /// <summary>discard_sector_alignment: a host file system block (4 KiB), where holes can be punched.</summary>
    public const uint DiscardSectorAlignment = 8;
    /// <summary>Bytes of the configuration layout exposed (§5.2.4): up to and including
    /// <c>write_zeroes_may_unmap</c> and its padding.</summary>
    public const int ConfigSize = 60;
    /// <summary>Store reads and writes go straight between the store and guest memory through its host
    /// view (<see cref="IGuestMemory.HostMemory"/>), one call for up to <see cref="MaxVector"/> pieces
    /// of at most this size (vectored for more than one); a request with a buffer that has no host view goes through a
    /// bounce buffer of this size, one call per piece.</summary>
    public const int ChunkBytes = 256 * 1024;
    /// <summary>Pieces in one vectored read or write (below Linux's IOV_MAX, 1024).</summary>
    public const int MaxVector = 256;

    // Offsets in struct virtio_blk_config (§5.2.4).
    private const int CfgCapacity = 0;
    private const int CfgSegMax = 12;
    private const int CfgBlkSize = 20;
    private const int CfgMaxDiscardSectors = 36;
    private const int CfgMaxDiscardSeg = 40;
    private const int CfgDiscardSectorAlignment = 44;
    private const int CfgMaxWriteZeroesSectors = 48;
    private const int CfgMaxWriteZeroesSeg = 52;
    private const int CfgWriteZeroesMayUnmap = 56;

    private readonly IGuestMemory _memory;
    private readonly IBlockBackend _backend;
    private readonly Func<ulong> _driverFeatures;
    private readonly byte[] _id = new byte[VirtioBlkRequest.IdBytes];
    private readonly byte[] _config = new byte[ConfigSize];
    private readonly byte[] _bounce = new byte[ChunkBytes];

    /// <summary>Capacity in 512-byte sectors.</summary>
    public ulong Capacity { get; }

    public ushort DeviceId => VirtioDeviceId;
    public ulong Features { get; }
    public IReadOnlyList<ushort> QueueMaxSizes { get; } = [QueueSize];
    public int ConfigLength => ConfigSize;

    /// <summary>A disk over <paramref name="backend"/> (read-only if it is), showing its whole 512-byte
    /// sectors. The model does not own the backend (its owner disposes it, and a restarted model gets
    /// the same one).</summary>
    /// <param name="memory">Guest memory of the buffers (the queue has checked they are RAM).</param>
    /// <param name="serial">The device ID string returned by GET_ID: ASCII, at most 20 bytes.</param>
    /// <param name="driverFeatures">The features the driver negotiated (read per request, so it follows
    /// resets): without VIRTIO_BLK_F_FLUSH every write is made stable before it completes.</param>
    public VirtioBlk(IGuestMemory memory, IBlockBackend backend, string serial, Func<ulong> driverFeatures)
        : this(memory, backend, serial, driverFeatures, (ulong)backend.Length / VirtioBlkRequest.SectorSize)
    {
    }

    private VirtioBlk(IGuestMemory memory, IBlockBackend backend, string serial, Func<ulong> driverFeatures, ulong capacity)
    {
        if (serial.Length > VirtioBlkRequest.IdBytes || !Ascii.IsValid(serial) || serial.Contains('\0'))
            throw new ArgumentException($"a virtio-blk serial is at most {VirtioBlkRequest.IdBytes} ASCII characters without NUL: \"{serial}\"", nameof(serial));
        _memory = memory;
        _backend = backend;
        _driverFeatures = driverFeatures;
        Capacity = capacity;
        Encoding.ASCII.GetBytes(serial, _id);
        Features = VirtioBlkFeatures.SegMax | VirtioBlkFeatures.BlkSize | VirtioBlkFeatures.Flush
            | (backend.ReadOnly ? VirtioBlkFeatures.ReadOnly : VirtioBlkFeatures.Discard | VirtioBlkFeatures.WriteZeroes);

        var c = _config.AsSpan();
        BinaryPrimitives.WriteUInt64LittleEndian(c[CfgCapacity..], Capacity);
        BinaryPrimitives.WriteUInt32LittleEndian(c[CfgSegMax..], SegMax);
        BinaryPrimitives.WriteUInt32LittleEndian(c[CfgBlkSize..], BlockSize);
        if (!backend.ReadOnly)
        {
            BinaryPrimitives.WriteUInt32LittleEndian(c[CfgMaxDiscardSectors..], MaxZeroSectors);
            BinaryPrimitives.WriteUInt32LittleEndian(c[CfgMaxDiscardSeg..], MaxZeroSegments);
            BinaryPrimitives.WriteUInt32LittleEndian(c[CfgDiscardSectorAlignment..], DiscardSectorAlignment);
            BinaryPrimitives.WriteUInt32LittleEndian(c[CfgMaxWriteZeroesSectors..], MaxZeroSectors);
            BinaryPrimitives.WriteUInt32LittleEndian(c[CfgMaxWriteZeroesSeg..], MaxZeroSegments);
            c[CfgWriteZeroesMayUnmap] = 1;
        }
    }

    public VirtioBlkState State() => new(Capacity);

    /// <summary>The model continuing from <paramref name="state"/> over the same store.</summary>
    public static VirtioBlk FromState(VirtioBlkState state, IGuestMemory memory, IBlockBackend backend, string serial,
        Func<ulong> driverFeatures) => new(memory, backend, serial, driverFeatures, state.Capacity);

    /// <summary>Reads <paramref name="size"/> bytes (1, 2, 4 or 8, little-endian) of the configuration
    /// at <paramref name="offset"/>, at any alignment; bytes past the layout read 0. The 64-bit
    /// capacity may be read whole or in halves (it never changes, so the generation does not move).</summary>
    public ulong ReadConfig(ulong offset, int size)
    {
        ulong value = 0;
        for (var i = 0; i < size && i < 8; i++)
        {
            var at = offset + (ulong)i;
            if (at < ConfigSize) value |= (ulong)_config[at] << (8 * i);
        }
        return value;
    }

    /// <summary>Every field is read-only without VIRTIO_BLK_F_CONFIG_WCE (not offered): writes are ignored.</summary>
    public void WriteConfig(ulong offset, int size, ulong value) { }

    public void Reset() { }

    /// <summary>Completes every available request, in order, then asks for the next notification
    /// (re-checking the ring, §2.7.10). Stops when the queue breaks.</summary>
    public void Process(int queue, SplitVirtqueue ring)
    {
        if (queue != 0) return;
        do
        {
            ring.DisableNotifications();
            while (ring.TryPop(out var chain))
                if (!ring.Push(chain.Head, Execute(chain))) return;
            if (ring.Error is not null) return;
        } while (ring.EnableNotifications());
    }

    /// <summary>Carries out one request and writes its status; returns the used length.</summary>
    private uint Execute(DescriptorChain chain)
    {
        var writable = chain.WritableLength;
        if (writable == 0) return 0; // no status byte: nothing can be reported, nothing is done
        var status = Slice(chain.Writable, writable - 1, 1)[0].Address;
        var result = Run(chain, writable - 1);
        Span<byte> s = [result];
        if (!_memory.TryWrite(status, s)) return 0;
        return (uint)writable;
    }

    private byte Run(DescriptorChain chain, ulong writableData)
    {
        var readable = chain.ReadableLength;
        if (readable < VirtioBlkRequest.HeaderSize) return VirtioBlkRequest.StatusIoErr;
        Span<byte> header = stackalloc byte[VirtioBlkRequest.HeaderSize];
        if (!Gather(Slice(chain.Readable, 0, VirtioBlkRequest.HeaderSize), header)) return VirtioBlkRequest.StatusIoErr;
        var type = BinaryPrimitives.ReadUInt32LittleEndian(header);
        var sector = BinaryPrimitives.ReadUInt64LittleEndian(header[8..]);
        var readableData = readable - VirtioBlkRequest.HeaderSize;
        try
        {
            return type switch
            {
                VirtioBlkRequest.In when readableData == 0 =>
                    Read(sector, Slice(chain.Writable, 0, writableData)),
                VirtioBlkRequest.Out when writableData == 0 =>
                    Write(sector, Slice(chain.Readable, VirtioBlkRequest.HeaderSize, readableData)),
                VirtioBlkRequest.Flush => Flush(),
                VirtioBlkRequest.GetId when readableData == 0 && writableData == VirtioBlkRequest.IdBytes =>
                    GetId(Slice(chain.Writable, 0, writableData)),
                VirtioBlkRequest.Discard or VirtioBlkRequest.WriteZeroes when (Features & ZeroFeature(type)) == 0 =>
                    VirtioBlkRequest.StatusUnsupported,
                VirtioBlkRequest.Discard or VirtioBlkRequest.WriteZeroes when writableData == 0 =>
                    Zero(type, Slice(chain.Readable, VirtioBlkRequest.HeaderSize, readableData), readableData),
                VirtioBlkRequest.In or VirtioBlkRequest.Out or VirtioBlkRequest.GetId or VirtioBlkRequest.Discard
                    or VirtioBlkRequest.WriteZeroes => VirtioBlkRequest.StatusIoErr, // data on the wrong side or of the wrong length
                _ => VirtioBlkRequest.StatusUnsupported,
            };
        }
        catch (IOException)
        {
            return VirtioBlkRequest.StatusIoErr;
        }
        catch (UnauthorizedAccessException)
        {
            return VirtioBlkRequest.StatusIoErr;
        }
    }

    private static ulong ZeroFeature(uint type) =>
        type == VirtioBlkRequest.Discard ? VirtioBlkFeatures.Discard : VirtioBlkFeatures.WriteZeroes;

    /// <summary>Whether [sector, +count) lies within the capacity, without overflowing.</summary>
    private bool InCapacity(ulong sector, ulong count) => sector <= Capacity && count <= Capacity - sector;

    /// <summary>Whether a data region (length and segment count) is a valid IN / OUT payload at
    /// <paramref name="sector"/>.</summary>
    private bool ValidTransfer(ulong sector, List<GuestBuffer> data)
    {
        var length = Total(data);
        return length % VirtioBlkRequest.SectorSize == 0
            && (ulong)data.Count <= SegMax
            && InCapacity(sector, length / VirtioBlkRequest.SectorSize);
    }

    private byte Read(ulong sector, List<GuestBuffer> data)
    {
        if (!ValidTransfer(sector, data)) return VirtioBlkRequest.StatusIoErr;
        var offset = (long)(sector * VirtioBlkRequest.SectorSize);
        if (HostViews(data) is { } direct)
        {
            // Straight into guest memory: one pread for one piece, else one preadv per batch.
            if (direct.Count == 1)
            {
                var target = direct[0].Span;
                target[_backend.Read(offset, target)..].Clear(); // past the end of a file shorter than the capacity: zeroes, as a hole
            }
            else
                for (var i = 0; i < direct.Count; i += MaxVector)
                {
                    var batch = direct.GetRange(i, Math.Min(MaxVector, direct.Count - i));
                    ClearAfter(batch, _backend.Read(offset, batch));
                    offset += Length(batch);
                }
            foreach (var piece in Pieces(data)) _memory.Written(piece.Address, piece.Length);
            return VirtioBlkRequest.StatusOk;
        }
        foreach (var piece in Pieces(data))
        {
            var chunk = _bounce.AsSpan(0, (int)piece.Length);
            var n = _backend.Read(offset, chunk);
            chunk[n..].Clear();
            if (!_memory.TryWrite(piece.Address, chunk)) return VirtioBlkRequest.StatusIoErr;
            offset += chunk.Length;
        }
        return VirtioBlkRequest.StatusOk;
    }

    private byte Write(ulong sector, List<GuestBuffer> data)
    {
        if (!ValidTransfer(sector, data) || _backend.ReadOnly) return VirtioBlkRequest.StatusIoErr;
        var offset = (long)(sector * VirtioBlkRequest.SectorSize);
        if (HostViews(data) is { } direct)
        {
            // Straight from guest memory: one pwrite for one piece, else one pwritev per batch.
            if (direct.Count == 1) _backend.Write(offset, direct[0].Span);
            else
                for (var i = 0; i < direct.Count; i += MaxVector)
                {
                    var batch = direct.GetRange(i, Math.Min(MaxVector, direct.Count - i));
                    _backend.Write(offset, batch.ConvertAll(m => (ReadOnlyMemory<byte>)m));
                    offset += Length(batch);
                }
            return WriteThrough();
        }
        foreach (var piece in Pieces(data))
        {
            var chunk = _bounce.AsSpan(0, (int)piece.Length);
            if (!_memory.TryRead(piece.Address, chunk)) return VirtioBlkRequest.StatusIoErr;
            _backend.Write(offset, chunk);
            offset += chunk.Length;
        }
        return WriteThrough();
    }

    /// <summary>The host's view of every piece of the buffers, in order; null if one has none (then
    /// the request goes through the bounce buffer).</summary>
    private List<Memory<byte>>? HostViews(List<GuestBuffer> data)
    {
        var views = new List<Memory<byte>>(data.Count);
        foreach (var piece in Pieces(data))
        {
            var m = _memory.HostMemory(piece.Address, (int)piece.Length);
            if (m.IsEmpty) return null;
            views.Add(m);
        }
        return views;
    }

    private static long Length(List<Memory<byte>> buffers)
    {
        var n = 0L;
        foreach (var b in buffers) n += b.Length;
        return n;
    }

    /// <summary>Zeroes the bytes of <paramref name="buffers"/> after the first <paramref name="keep"/>.</summary>
    private static void ClearAfter(IEnumerable<Memory<byte>> buffers, long keep)
    {
        foreach (var b in buffers)
        {
            if (keep >= b.Length)
            {
                keep -= b.Length;
                continue;
            }
            b.Span[(int)keep..].Clear();
            keep = 0;
        }
    }

    /// <summary>The buffers cut into pieces of at most <see cref="ChunkBytes"/>, in order.</summary>
    private static IEnumerable<GuestBuffer> Pieces(List<GuestBuffer> buffers)
    {
        foreach (var b in buffers)
            for (var done = 0u; done < b.Length;)
            {
                var n = Math.Min(b.Length - done, (uint)ChunkBytes);
                yield return new GuestBuffer(b.Address + done, n);
                done += n;
            }
    }

    private byte Flush()
    {
        _backend.Flush();
        return VirtioBlkRequest.StatusOk;
    }

    /// <summary>A completed write is stable at once if the driver cannot ask for a flush (§5.2.6.2).</summary>
    private byte WriteThrough()
    {
        if ((_driverFeatures() & VirtioBlkFeatures.Flush) == 0) _backend.Flush();
        return VirtioBlkRequest.StatusOk;
    }

    private byte GetId(List<GuestBuffer> data)
    {
        var cursor = new Cursor(data);
        return cursor.CopyTo(_memory, _id) ? VirtioBlkRequest.StatusOk : VirtioBlkRequest.StatusIoErr;
    }

    /// <summary>DISCARD or WRITE_ZEROES: every segment is checked before any is carried out.</summary>
    private byte Zero(uint type, List<GuestBuffer> data, ulong length)
    {
        if (length == 0 || length % VirtioBlkRequest.SegmentSize != 0 || length / VirtioBlkRequest.SegmentSize > MaxZeroSegments)
            return VirtioBlkRequest.StatusIoErr;
        if (_backend.ReadOnly) return VirtioBlkRequest.StatusIoErr;
        var count = (int)(length / VirtioBlkRequest.SegmentSize);
        Span<byte> raw = stackalloc byte[(int)length];
        if (!Gather(data, raw)) return VirtioBlkRequest.StatusIoErr;
        var unsupported = false;
        var invalid = false;
        for (var i = 0; i < count; i++)
        {
            var s = raw.Slice(i * VirtioBlkRequest.SegmentSize, VirtioBlkRequest.SegmentSize);
            var sector = BinaryPrimitives.ReadUInt64LittleEndian(s);
            var sectors = BinaryPrimitives.ReadUInt32LittleEndian(s[8..]);
            var flags = BinaryPrimitives.ReadUInt32LittleEndian(s[12..]);
            if ((flags & ~VirtioBlkRequest.FlagUnmap) != 0 || (type == VirtioBlkRequest.Discard && flags != 0)) unsupported = true;
            if (sectors > MaxZeroSectors || !InCapacity(sector, sectors)) invalid = true;
        }
        if (unsupported) return VirtioBlkRequest.StatusUnsupported;
        if (invalid) return VirtioBlkRequest.StatusIoErr;
        for (var i = 0; i < count; i++)
        {
            var s = raw.Slice(i * VirtioBlkRequest.SegmentSize, VirtioBlkRequest.SegmentSize);
            var offset = (long)(BinaryPrimitives.ReadUInt64LittleEndian(s) * VirtioBlkRequest.SectorSize);
            var bytes = (long)BinaryPrimitives.ReadUInt32LittleEndian(s[8..]) * VirtioBlkRequest.SectorSize;
            if (type == VirtioBlkRequest.Discard) _backend.Discard(offset, bytes);
            else _backend.WriteZeroes(offset, bytes, mayUnmap: (BinaryPrimitives.ReadUInt32LittleEndian(s[12..]) & VirtioBlkRequest.FlagUnmap) != 0);
        }
        return WriteThrough();
    }

    private bool Gather(List<GuestBuffer> from, Span<byte> into) => new Cursor(from).CopyFrom(_memory, into);

    private static ulong Total(List<GuestBuffer> buffers) => buffers.Aggregate(0UL, (n, b) => n + b.Length);

    /// <summary>The buffers covering bytes [<paramref name="skip"/>, +<paramref name="length"/>) of the
    /// concatenation of <paramref name="buffers"/>, without empty pieces. The range lies within them.</summary>
    private static List<GuestBuffer> Slice(IReadOnlyList<GuestBuffer> buffers, ulong skip, ulong length)
    {
        var result = new List<GuestBuffer>();
        foreach (var b in buffers)
        {
            if (length == 0) break;
            if (skip >= b.Length)
            {
                skip -= b.Length;
                continue;
            }
            var n = Math.Min(b.Length - skip, length);
            result.Add(new GuestBuffer(b.Address + skip, (uint)n));
            length -= n;
            skip = 0;
        }
        return result;
    }

    /// <summary>A position in a list of guest buffers, copied to or from in order.</summary>
    private sealed class Cursor(List<GuestBuffer> buffers)
    {
        private int _index;
        private uint _offset;

        public ulong Remaining { get; private set; } = Total(buffers);
        public bool Done => Remaining == 0;

        /// <summary>Copies <paramref name="source"/> into the next bytes of the buffers (all of it fits).</summary>
        public bool CopyTo(IGuestMemory memory, ReadOnlySpan<byte> source)
        {
            while (!source.IsEmpty)
            {
                var (at, n) = Next(source.Length);
                if (!memory.TryWrite(at, source[..n])) return false;
                source = source[n..];
            }
            return true;
        }

        /// <summary>Fills <paramref name="destination"/> from the next bytes of the buffers.</summary>
        public bool CopyFrom(IGuestMemory memory, Span<byte> destination)
        {
            while (!destination.IsEmpty)
            {
                var (at, n) = Next(destination.Length);
                if (!memory.TryRead(at, destination[..n])) return false;
                destination = destination[n..];
            }
            return true;
        }

        private (GuestPhysAddr At, int Length) Next(int wanted)
        {
            var b = buffers[_index];
            var n = (int)Math.Min((uint)wanted, b.Length - _offset);
            var at = b.Address + _offset;
            _offset += (uint)n;
            Remaining -= (ulong)n;
            if (_offset == b.Length)
            {
                _index++;
                _offset = 0;
            }
            return (at, n);
        }
    }
}
