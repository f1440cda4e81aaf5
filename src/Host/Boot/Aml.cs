using System.Text;

namespace ActorVmm.Host.Boot;

/// <summary>
/// An encoder for the few ACPI Machine Language terms the DSDT uses (ACPI 6.5 §20.2, "AML
/// Grammar Definition") and the resource descriptors of a <c>ResourceTemplate</c> (§6.4,
/// "Resource Data Types for ACPI"). Each function returns the encoded bytes of one term; a
/// container (Scope, Device, Package, Buffer) takes its already-encoded contents and prefixes its
/// PkgLength. Integers are encoded in the shortest form, as ASL compilers do (§20.2.3).
/// </summary>
public static class Aml
{
    // Opcodes and prefixes (§20.2.3 Data Objects, §20.2.5 Term Objects, §20.2.2 Name Objects).
    public const byte ZeroOp = 0x00, OneOp = 0x01, NameOp = 0x08, BytePrefix = 0x0A, WordPrefix = 0x0B,
        DWordPrefix = 0x0C, StringPrefix = 0x0D, QWordPrefix = 0x0E, ScopeOp = 0x10, BufferOp = 0x11,
        PackageOp = 0x12, DualNamePrefix = 0x2E, MultiNamePrefix = 0x2F, ExtOpPrefix = 0x5B, DeviceOp = 0x82,
        RootChar = (byte)'\\', NullName = 0x00;

    /// <summary>PkgLength (§20.2.4) of a package whose contents after the PkgLength are
    /// <paramref name="contentLength"/> bytes: the encoded length counts the PkgLength bytes
    /// themselves. One byte (bits 5:0) below 63; otherwise bits 7:6 of the lead byte count the
    /// following bytes, the lead byte's bits 3:0 are the low nibble and each following byte the
    /// next 8 bits.</summary>
    public static byte[] PkgLength(int contentLength)
    {
        if (contentLength < 0) throw new ArgumentOutOfRangeException(nameof(contentLength));
        if (contentLength + 1 < 0x40) return [(byte)(contentLength + 1)];
        for (var follow = 1; follow <= 3; follow++)
        {
            var total = contentLength + 1 + follow;
            if (total >= 1 << (4 + 8 * follow)) continue;
            var b = new byte[1 + follow];
            b[0] = (byte)((follow << 6) | (total & 0xF));
            for (var i = 1; i <= follow; i++) b[i] = (byte)(total >> (4 + 8 * (i - 1)));
            return b;
        }
        throw new ArgumentOutOfRangeException(nameof(contentLength), "a PkgLength holds at most 2^28-1 bytes");
    }

    /// <summary>A NameSeg (§20.2.2): four characters from A-Z, 0-9 and '_' (not a digit first),
    /// padded with '_' as ASL pads shorter names.</summary>
    public static byte[] NameSeg(string seg)
    {
        if (seg.Length is < 1 or > 4 || char.IsAsciiDigit(seg[0]) || seg.Any(c => !(char.IsAsciiLetterUpper(c) || char.IsAsciiDigit(c) || c == '_')))
            throw new ArgumentException($"'{seg}' is not an AML NameSeg", nameof(seg));
        return Encoding.ASCII.GetBytes(seg.PadRight(4, '_'));
    }

    /// <summary>A NameString (§20.2.2): an optional root prefix '\', then one NameSeg, a
    /// DualNamePath (0x2E) of two or a MultiNamePath (0x2F, count) of more, '.'-separated.</summary>
    public static byte[] NameString(string path)
    {
        var rooted = path.StartsWith('\\');
        var body = rooted ? path[1..] : path;
        var segs = body.Length == 0 ? [] : body.Split('.').Select(NameSeg).ToArray();
        var prefix = rooted ? new[] { RootChar } : [];
        return segs.Length switch
        {
            0 => [.. prefix, NullName],
            1 => [.. prefix, .. segs[0]],
            2 => [.. prefix, DualNamePrefix, .. segs[0], .. segs[1]],
            _ => [.. prefix, MultiNamePrefix, (byte)segs.Length, .. segs.SelectMany(s => s)],
        };
    }

    /// <summary>An integer constant in its shortest encoding (§20.2.3): ZeroOp, OneOp, ByteConst,
    /// WordConst, DWordConst or QWordConst, little-endian.</summary>
    public static byte[] Integer(ulong value) => value switch
    {
        0 => [ZeroOp],
        1 => [OneOp],
        <= 0xFF => [BytePrefix, (byte)value],
        <= 0xFFFF => [WordPrefix, (byte)value, (byte)(value >> 8)],
        <= 0xFFFF_FFFF => [DWordPrefix, .. BitConverter.GetBytes((uint)value)],
        _ => [QWordPrefix, .. BitConverter.GetBytes(value)],
    };

    /// <summary>A String (§20.2.3): StringPrefix, ASCII characters 0x01-0x7F, a NUL.</summary>
    public static byte[] String(string s) => [StringPrefix, .. Encoding.ASCII.GetBytes(s), 0];

    /// <summary>The 32-bit compressed EISA id of ASL's EISAID() (§19.6, "EISAID"): three upper-case
    /// letters as 5-bit values (letter - 0x40) in the first two bytes, big-endian, then four hex
    /// digits as two bytes, stored in that byte order (so "PNP0A08" is the DWord 0x080AD041).</summary>
    public static uint EisaIdValue(string id)
    {
        if (id.Length != 7 || !id[..3].All(char.IsAsciiLetterUpper) || !id[3..].All(char.IsAsciiHexDigit))
            throw new ArgumentException($"'{id}' is not an EISA id (three letters, four hex digits)", nameof(id));
        var vendor = (id[0] - 0x40) << 10 | (id[1] - 0x40) << 5 | (id[2] - 0x40);
        var product = Convert.ToUInt16(id[3..], 16);
        return (uint)((vendor >> 8) | (vendor & 0xFF) << 8 | (product >> 8) << 16 | (product & 0xFF) << 24);
    }

    public static byte[] EisaId(string id) => Integer(EisaIdValue(id));

    /// <summary><c>Name (path, data)</c> (DefName, §20.2.5.1).</summary>
    public static byte[] Name(string path, byte[] data) => [NameOp, .. NameString(path), .. data];

    /// <summary><c>Package (n) { ... }</c> (DefPackage, §20.2.5.4): PackageOp, PkgLength, NumElements (a byte).</summary>
    public static byte[] Package(params byte[][] elements)
    {
        if (elements.Length > 0xFF) throw new ArgumentOutOfRangeException(nameof(elements), "a Package holds at most 255 elements");
        byte[] body = [(byte)elements.Length, .. elements.SelectMany(e => e)];
        return [PackageOp, .. PkgLength(body.Length), .. body];
    }

    /// <summary><c>Buffer (n) { bytes }</c> (DefBuffer, §20.2.5.4): BufferOp, PkgLength, the size as an integer, the bytes.</summary>
    public static byte[] Buffer(byte[] bytes)
    {
        byte[] body = [.. Integer((ulong)bytes.Length), .. bytes];
        return [BufferOp, .. PkgLength(body.Length), .. body];
    }

    /// <summary><c>Scope (path) { terms }</c> (DefScope, §20.2.5.1).</summary>
    public static byte[] Scope(string path, params byte[][] terms)
    {
        byte[] body = [.. NameString(path), .. terms.SelectMany(t => t)];
        return [ScopeOp, .. PkgLength(body.Length), .. body];
    }

    /// <summary><c>Device (name) { terms }</c> (DefDevice, §20.2.5.2): ExtOpPrefix DeviceOp, PkgLength, the name, the terms.</summary>
    public static byte[] Device(string name, params byte[][] terms)
    {
        byte[] body = [.. NameString(name), .. terms.SelectMany(t => t)];
        return [ExtOpPrefix, DeviceOp, .. PkgLength(body.Length), .. body];
    }

    // ---- Resource descriptors (§6.4) ----

    /// <summary><c>ResourceTemplate () { ... }</c>: a Buffer of the descriptors and an End Tag
    /// (§6.4.2.9: small item 0x79 and a checksum byte; 0 means "treat the checksum as valid",
    /// what ASL compilers emit).</summary>
    public static byte[] ResourceTemplate(params byte[][] descriptors) =>
        Buffer([.. descriptors.SelectMany(d => d), 0x79, 0x00]);

    /// <summary><c>IO (Decode16, min, max, alignment, length)</c>: the I/O Port Descriptor
    /// (§6.4.2.5), small item 0x47, 8 bytes; information bit 0 = 16-bit decode.</summary>
    public static byte[] Io(ushort min, ushort max, byte alignment, byte length) =>
        [0x47, 0x01, (byte)min, (byte)(min >> 8), (byte)max, (byte)(max >> 8), alignment, length];

    /// <summary><c>IRQNoFlags () { irq }</c>: the IRQ Descriptor without its information byte
    /// (§6.4.2.1), small item 0x22: a 16-bit mask, and the interrupt is edge-triggered, active high (ISA).</summary>
    public static byte[] IrqNoFlags(int irq) => [0x22, (byte)(1 << irq), (byte)((1 << irq) >> 8)];

    /// <summary><c>Memory32Fixed (ReadWrite, base, length)</c>: the 32-bit Fixed Memory Range
    /// Descriptor (§6.4.3.4), large item 0x86, 12 bytes; information bit 0 = read/write.</summary>
    public static byte[] Memory32Fixed(uint @base, uint length) =>
        [0x86, 9, 0, 0x01, .. BitConverter.GetBytes(@base), .. BitConverter.GetBytes(length)];

    /// <summary>Address space resource types (§6.4.3.5, Table "Resource type").</summary>
    public const byte MemoryRange = 0, IoRange = 1, BusNumberRange = 2;

    /// <summary>General flags of an address space descriptor (§6.4.3.5.1-3): bit 3 _MAF (max
    /// fixed), bit 2 _MIF (min fixed), bit 1 _DEC (1 = subtractive), bit 0 (1 = consumer only,
    /// 0 = produces for its children). A root bridge's windows: producer, positive decode, fixed.</summary>
    public const byte ProducerMinMaxFixed = 0b1100;

    /// <summary>A Word Address Space Descriptor (§6.4.3.5.3), large item 0x88, 16 bytes:
    /// <c>WordBusNumber</c> (type 2, no type-specific flags) or <c>WordIO</c> (type 1, type-specific
    /// flags _RNG = 3, EntireRange): granularity 0, min, max, translation 0, length max-min+1.</summary>
    public static byte[] WordAddress(byte type, ushort min, ushort max)
    {
        byte specific = type == IoRange ? (byte)0b11 : (byte)0;
        var length = (ushort)(max - min + 1);
        return [0x88, 13, 0, type, ProducerMinMaxFixed, specific,
            0, 0, (byte)min, (byte)(min >> 8), (byte)max, (byte)(max >> 8), 0, 0, (byte)length, (byte)(length >> 8)];
    }

    /// <summary><c>DWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed, NonCacheable,
    /// ReadWrite, 0, min, max, 0, length)</c>: the DWord Address Space Descriptor (§6.4.3.5.2),
    /// large item 0x87, 26 bytes; type-specific flags bit 0 _RW = read/write, bits 2:1 _MEM = 0
    /// non-cacheable, _MTP = 0 AddressRangeMemory, _TTP = 0.</summary>
    public static byte[] DWordMemory(uint min, uint max)
    {
        var length = max - min + 1;
        return [0x87, 23, 0, MemoryRange, ProducerMinMaxFixed, 0x01,
            .. BitConverter.GetBytes(0u), .. BitConverter.GetBytes(min), .. BitConverter.GetBytes(max),
            .. BitConverter.GetBytes(0u), .. BitConverter.GetBytes(length)];
    }
}
