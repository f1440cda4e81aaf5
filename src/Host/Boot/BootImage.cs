using ActorVmm.LibVmm;
using ActorVmm.Vcpu;

namespace ActorVmm.Host.Boot;

/// <summary>An image that cannot be booted as asked (empty, too big, outside RAM, overlapping).</summary>
public sealed class BootException(string message) : VmmException(message);

/// <summary>The boot vcpu's registers after loading; null parts keep KVM's reset state.</summary>
public sealed record BootState(RegisterState? Registers, Func<SpecialRegisterState, SpecialRegisterState>? Special)
{
    public static readonly BootState Reset = new(null, null);

    public void ApplyTo(IVcpu vcpu)
    {
        if (Special is not null)
        {
            var current = vcpu.GetSpecialRegisters();
            vcpu.SetSpecialRegisters(Special(SpecialRegisterState.From(current)).ApplyTo(current));
        }
        if (Registers is not null) vcpu.SetRegisters(Registers.ToKvm());
    }
}

/// <summary>What to boot and how. Loaders depend on <see cref="IGuestMemory"/> only.</summary>
public abstract record BootImage
{
    /// <summary>Bytes to place below 4 GiB as firmware (only <see cref="FirmwareImage"/>).</summary>
    public virtual byte[]? Firmware => null;

    /// <summary>Copies the image into guest memory and returns the boot vcpu's state.</summary>
    public abstract BootState Load(IGuestMemory memory);

    protected static void Require(bool condition, string message)
    {
        if (!condition) throw new BootException(message);
    }

    protected static void LoadAt(IGuestMemory memory, ulong address, byte[] image, string what)
    {
        Require(image.Length > 0, $"{what} is empty");
        Require(memory.IsMapped(new GuestPhysAddr(address), (ulong)image.Length),
            $"{what} of {image.Length} bytes at 0x{address:X} does not fit in guest RAM");
        memory.Write(new GuestPhysAddr(address), image);
    }
}

/// <summary>
/// A flat firmware image (like QEMU's -bios): right-aligned below 4 GiB so that its last 16
/// bytes hold the reset vector at F000:FFF0, with its last 128 KiB aliased below 1 MiB. The
/// vcpu starts in KVM's reset state (real mode, CS base 0xFFFF0000, IP 0xFFF0).
/// </summary>
public sealed record FirmwareImage(byte[] Image) : BootImage
{
    public const int MaxSize = 16 * 1024 * 1024;

    public override byte[] Firmware
    {
        get
        {
            Require(Image.Length > 0, "the firmware image is empty");
            Require(Image.Length <= MaxSize, $"the firmware image is {Image.Length} bytes; at most {MaxSize} fit below 4 GiB");
            Require(Image.Length >= 16, "the firmware image is smaller than 16 bytes and cannot hold the reset vector");
            return Image;
        }
    }

    public override BootState Load(IGuestMemory memory) => BootState.Reset;
}

/// <summary>A flat binary loaded at an address, entered in real mode at CS:IP with DS=ES=SS=CS.</summary>
public sealed record FlatImage(byte[] Image, ulong LoadAddress, ushort Cs, ushort Ip) : BootImage
{
    /// <summary>The conventional CS:IP for a load address: 0000:addr below 64 KiB, else (addr&gt;&gt;4):(addr&amp;0xF).</summary>
    public static (ushort Cs, ushort Ip) DefaultEntry(ulong loadAddress) =>
        loadAddress < 0x10000 ? ((ushort)0, (ushort)loadAddress) : ((ushort)(loadAddress >> 4), (ushort)(loadAddress & 0xF));

    public override BootState Load(IGuestMemory memory)
    {
        Require(LoadAddress < 0x10_0000, $"a real-mode image must load below 1 MiB, not at 0x{LoadAddress:X}");
        LoadAt(memory, LoadAddress, Image, "the flat image");
        var regs = RegisterState.Reset with { Rip = Ip, Rsp = 0xFFF0 };
        return new BootState(regs, s => s with
        {
            Cs = SegmentState.RealMode(Cs, code: true),
            Ds = SegmentState.RealMode(Cs, code: false),
            Es = SegmentState.RealMode(Cs, code: false),
            Ss = SegmentState.RealMode(Cs, code: false),
            Fs = SegmentState.RealMode(0, code: false),
            Gs = SegmentState.RealMode(0, code: false),
        });
    }
}

/// <summary>
/// 64-bit code entered directly in long mode: the VMM writes a GDT and identity-maps the low
/// 4 GiB with 2 MiB pages (so the guest reaches RAM and the MMIO hole), then sets CR0/CR3/CR4/EFER
/// and a 64-bit CS. The boot structures live at 0x1000–0x7FFF; the stack tops at 0x9F000.
/// </summary>
public sealed record LongModeImage(byte[] Code, ulong LoadAddress, ulong Entry) : BootImage
{
    public const ulong GdtAddress = 0x1000;
    public const ulong Pml4Address = 0x2000;
    public const ulong PdptAddress = 0x3000;
    public const ulong PdAddress = 0x4000; // four page directories: 0x4000-0x7FFF
    public const ulong BootAreaEnd = 0x8000;
    public const ulong StackTop = 0x9F000;
    public const ushort CodeSelector = 0x08;
    public const ushort DataSelector = 0x10;
    public const ushort Code32Selector = 0x18;

    private const ulong PagePresent = 0b0000_0001;
    private const ulong PageWritable = 0b0000_0010;
    private const ulong PageSize2M = 0b1000_0000;

    public override BootState Load(IGuestMemory memory)
    {
        Require(LoadAddress >= BootAreaEnd || LoadAddress + (ulong)Code.Length <= GdtAddress,
            $"64-bit code at 0x{LoadAddress:X} overlaps the boot page tables at 0x{GdtAddress:X}-0x{BootAreaEnd - 1:X}");
        Require(Entry >= LoadAddress && Entry < LoadAddress + (ulong)Code.Length,
            $"entry 0x{Entry:X} is outside the loaded code");
        Require(memory.IsMapped(new GuestPhysAddr(0), StackTop), "guest RAM is too small for the 64-bit boot structures");
        LoadAt(memory, LoadAddress, Code, "the 64-bit image");
        WriteGdt(memory);
        WritePageTables(memory);
        var regs = RegisterState.Reset with { Rip = Entry, Rsp = StackTop, Rflags = 0x2 };
        return new BootState(regs, s => s with
        {
            Cs = SegmentState.Long64(CodeSelector, code: true),
            Ds = SegmentState.Long64(DataSelector, code: false),
            Es = SegmentState.Long64(DataSelector, code: false),
            Fs = SegmentState.Long64(DataSelector, code: false),
            Gs = SegmentState.Long64(DataSelector, code: false),
            Ss = SegmentState.Long64(DataSelector, code: false),
            Gdt = new TableState(GdtAddress, 4 * 8 - 1),
            Idt = new TableState(0, 0),
            Cr0 = SpecialRegisterState.Cr0Pe | SpecialRegisterState.Cr0Pg | SpecialRegisterState.Cr0Et |
                  SpecialRegisterState.Cr0Ne | 0b10, // MP
            Cr3 = Pml4Address,
            Cr4 = SpecialRegisterState.Cr4Pae | (1UL << 9) | (1UL << 10), // OSFXSR, OSXMMEXCPT
            Efer = SpecialRegisterState.EferLme | SpecialRegisterState.EferLma,
        });
    }

    /// <summary>A flat GDT: null, 64-bit code (0x08), data (0x10), 32-bit code (0x18).</summary>
    internal static void WriteGdt(IGuestMemory memory)
    {
        ulong[] gdt =
        [
            0,
            0x00AF_9A00_0000_FFFF, // 64-bit code: P, DPL 0, execute/read, L, G
            0x00CF_9200_0000_FFFF, // data: P, DPL 0, read/write, D/B, G
            0x00CF_9A00_0000_FFFF, // 32-bit code
        ];
        for (var i = 0; i < gdt.Length; i++) memory.WriteUInt64(new GuestPhysAddr(GdtAddress + (ulong)i * 8), gdt[i]);
    }

    /// <summary>Identity-maps the low 4 GiB with 2 MiB pages: PML4 0x2000, PDPT 0x3000, PDs 0x4000-0x7FFF.</summary>
    internal static void WritePageTables(IGuestMemory memory)
    {
        var zero = new byte[BootAreaEnd - Pml4Address];
        memory.Write(new GuestPhysAddr(Pml4Address), zero);
        memory.WriteUInt64(new GuestPhysAddr(Pml4Address), PdptAddress | PagePresent | PageWritable);
        for (ulong gib = 0; gib < 4; gib++)
        {
            var pd = PdAddress + gib * 0x1000;
            memory.WriteUInt64(new GuestPhysAddr(PdptAddress + gib * 8), pd | PagePresent | PageWritable);
            for (ulong i = 0; i < 512; i++)
            {
                var physical = (gib << 30) | (i << 21);
                memory.WriteUInt64(new GuestPhysAddr(pd + i * 8), physical | PagePresent | PageWritable | PageSize2M);
            }
        }
    }
}
